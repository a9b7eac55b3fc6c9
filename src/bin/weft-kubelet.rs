//! `weft kubelet` in a binary holding only its own code (see `weft::exec_daemon`): `weft kubelet …` runs it when it
//! is installed beside `weft`; run directly as `weft-kubelet …`, it takes the same flags.

fn main() {
    weft::daemon_main("kubelet", weft::daemons::KUBELET, |args: weft_control::kubelet::cli::KubeletArgs| {
        weft::daemons::kubelet(args)
    })
}
