//! `weft agent` in a binary holding only its own code (see `weft::exec_daemon`): `weft agent …` runs it when it
//! is installed beside `weft`; run directly as `weft-agent …`, it takes the same flags.

fn main() {
    weft::daemon_main("agent", weft::daemons::AGENT, |args: weft_agent::cli::AgentArgs| weft::daemons::agent(args))
}
