//! `weft controller` in a binary holding only its own code (see `weft::exec_daemon`): `weft controller …` runs it when it
//! is installed beside `weft`; run directly as `weft-controller …`, it takes the same flags.

fn main() {
    weft::daemon_main("controller", weft::daemons::CONTROLLER, |args: weft_control::cli::ControllerArgs| {
        weft::daemons::controller(args)
    })
}
