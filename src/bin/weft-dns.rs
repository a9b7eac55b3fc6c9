//! `weft dns` in a binary holding only its own code (see `weft::exec_daemon`): `weft dns …` runs it when it
//! is installed beside `weft`; run directly as `weft-dns …`, it takes the same flags.

fn main() {
    weft::daemon_main("dns", weft::daemons::DNS, |args: weft_dns::cli::DnsArgs| weft::daemons::dns(args))
}
