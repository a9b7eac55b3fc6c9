//! Builds every `bpf/*.bpf.c` into `$OUT_DIR/<name>.bpf.o` with clang `-target bpf -O2 -g` (BTF kept),
//! against libbpf's headers. There is no Rust-side eBPF toolchain here (no rust-src, no bpf-linker).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed={}", dir.display());
    // asm/types.h lives under the multiarch include directory on Debian.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    for src in sources {
        let name = src.file_name().and_then(|n| n.to_str()).unwrap_or_default().trim_end_matches(".c").to_string();
        let obj = out.join(format!("{name}.o"));
        let result = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .arg("-I")
            .arg(&dir)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output();
        match result {
            Err(e) => panic!(
                "weft-ebpf needs clang to build {}: running {clang:?} failed: {e}\n\
                 install clang, llvm and libbpf-dev (scripts/setup.sh does), or set CLANG=/path/to/clang",
                src.display()
            ),
            Ok(o) if !o.status.success() => panic!(
                "clang failed on {} ({}):\n{}\n(libbpf's headers come from libbpf-dev)",
                src.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Ok(_) => {}
        }
    }
}
