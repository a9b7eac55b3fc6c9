fn main() {
    if std::env::args_os()
        .next()
        .map(|a| std::path::Path::new(&a).file_name() == Some(std::ffi::OsStr::new("weft-cni")))
        .unwrap_or(false)
    {
        std::process::exit(weft_agent::cni::main());
    }
}
