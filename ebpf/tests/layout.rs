//! The Rust mirrors in `maps.rs` have the size and field offsets the object's BTF gives the C structs
//! of `bpf/lb.h` (read with `bpftool btf dump … format raw`, the operator's own tool).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// struct name → (size, field → byte offset), parsed from bpftool's raw BTF dump.
fn btf_structs(raw: &str) -> BTreeMap<String, (usize, BTreeMap<String, usize>)> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in raw.lines() {
        if line.starts_with('[') {
            current = None;
            // [8] STRUCT 'lb_svc_key' size=8 vlen=4
            let mut words = line.split_whitespace();
            let (_, kind, name) = (words.next(), words.next(), words.next());
            if kind == Some("STRUCT") {
                let name = name.unwrap_or("").trim_matches('\'').to_string();
                let size = words.find_map(|w| w.strip_prefix("size=")?.parse().ok()).unwrap_or(0);
                out.insert(name.clone(), (size, BTreeMap::new()));
                current = Some(name);
            }
        } else if let Some(name) = &current {
            // 	'vip' type_id=9 bits_offset=0
            let mut words = line.split_whitespace();
            let field = words.next().unwrap_or("").trim_matches('\'').to_string();
            if let Some(bits) = words.find_map(|w| w.strip_prefix("bits_offset=")?.parse::<usize>().ok()) {
                if let Some((_, fields)) = out.get_mut(name) {
                    fields.insert(field, bits / 8);
                }
            }
        }
    }
    out
}

#[test]
fn rust_mirrors_match_the_objects_btf() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let obj = dir.path().join("sock_lb.bpf.o");
    std::fs::write(&obj, weft_ebpf::loader::SOCK_LB_OBJECT)?;
    let np = dir.path().join("nodeport.bpf.o");
    std::fs::write(&np, weft_ebpf::loader::NODEPORT_OBJECT)?;
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&obj)
        .args(["format", "raw"])
        .output()
        .context("bpftool (package bpftool)")?;
    if !out.status.success() {
        bail!("bpftool btf dump: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut btf = btf_structs(&String::from_utf8_lossy(&out.stdout));
    let out = Command::new("bpftool").args(["btf", "dump", "file"]).arg(&np).args(["format", "raw"]).output()?;
    if !out.status.success() {
        bail!("bpftool btf dump: {}", String::from_utf8_lossy(&out.stderr));
    }
    for (name, layout) in btf_structs(&String::from_utf8_lossy(&out.stdout)) {
        // One header: a struct of lb.h both objects use has one layout (map definitions are anonymous).
        if let Some(seen) = btf.get(&name).filter(|_| name.starts_with("lb_")) {
            assert_eq!(seen, &layout, "struct {name} differs between the two objects");
        }
        btf.insert(name, layout);
    }
    let layouts = weft_ebpf::maps::layouts();
    assert_eq!(layouts.len(), 10, "every struct of lb.h is mirrored");
    for (name, size, fields) in layouts {
        let Some((btf_size, btf_fields)) = btf.get(name) else { bail!("struct {name} is not in the object's BTF") };
        assert_eq!(size, *btf_size, "size of struct {name}");
        let want: BTreeMap<String, usize> = fields.iter().map(|(f, o)| (f.to_string(), *o)).collect();
        assert_eq!(&want, btf_fields, "fields and offsets of struct {name}");
    }
    Ok(())
}

#[test]
fn btf_parser_reads_bpftool_raw_output() {
    let raw = "[1] INT 'int' size=4 bits_offset=0 nr_bits=32 encoding=SIGNED\n[8] STRUCT 'k' size=8 vlen=2\n\t'a' type_id=9 bits_offset=0\n\t'b' type_id=11 bits_offset=48\n[9] TYPEDEF '__u32' type_id=10\n";
    let s = btf_structs(raw);
    assert_eq!(s["k"], (8, [("a".to_string(), 0), ("b".to_string(), 6)].into()));
    assert_eq!(s.len(), 1);
}
