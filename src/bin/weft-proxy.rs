//! `weft proxy` in a binary holding only its own code (see `weft::exec_daemon`): `weft proxy …` runs it when it
//! is installed beside `weft`; run directly as `weft-proxy …`, it takes the same flags.

fn main() {
    weft::daemon_main("proxy", weft::daemons::PROXY, |args: weft_proxy::cli::ProxyArgs| weft::daemons::proxy(args))
}
