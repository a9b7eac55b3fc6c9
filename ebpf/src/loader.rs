//! Loads the socket LB object with aya, attaches its four programs to a cgroup v2 directory and pins
//! maps and links under one bpffs directory (so the datapath keeps working while the proxy is down and a
//! restart re-uses the maps); typed map writes; clean detach and unpin. Touches bpffs, the cgroup given
//! and the bpf(2) objects it creates, nothing else.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::programs::links::FdLink;
use aya::programs::{CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType};
use aya::{include_bytes_aligned, EbpfLoader};

use crate::maps::{
    Backend, BackendKey, MapOp, MapState, SvcKey, SvcVal, MAPS, MAP_AFFINITY, MAP_BACKENDS, MAP_CT, MAP_REVNAT,
    MAP_SERVICES,
};
use crate::sys;

/// The socket LB object built by build.rs from `bpf/sock_lb.bpf.c`.
pub static SOCK_LB_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.bpf.o"));

/// The north-south object built from `bpf/nodeport.bpf.c`.
pub static NODEPORT_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport.bpf.o"));

/// The tc programs and their direction on `--nodeport-interface`.
pub const NODEPORT_PROGRAMS: [(&str, TcAttachType); 2] =
    [("weft_nodeport_in", TcAttachType::Ingress), ("weft_nodeport_out", TcAttachType::Egress)];

/// The programs, their cgroup hook (`bpf_attach_type`) and `bpftool cgroup show`'s name for it.
pub const PROGRAMS: [(&str, u32, &str); 4] = [
    ("weft_connect4", sys::BPF_CGROUP_INET4_CONNECT, "cgroup_inet4_connect"),
    ("weft_sendmsg4", sys::BPF_CGROUP_UDP4_SENDMSG, "cgroup_udp4_sendmsg"),
    ("weft_recvmsg4", sys::BPF_CGROUP_UDP4_RECVMSG, "cgroup_udp4_recvmsg"),
    ("weft_getpeername4", sys::BPF_CGROUP_INET4_GETPEERNAME, "cgroup_inet4_getpeername"),
];

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading a BPF object (pinned maps under {pin_dir})")]
    Load { pin_dir: PathBuf, source: Box<aya::EbpfError> },
    #[error("program {program}: {call} failed")]
    Program { program: &'static str, call: &'static str, source: Box<ProgramError> },
    #[error("program {program}: {call} failed ({path})")]
    Attach { program: &'static str, call: &'static str, path: PathBuf, source: io::Error },
    #[error("program {program}: attaching to {interface} failed")]
    Tc { program: &'static str, interface: String, source: Box<ProgramError> },
    #[error("program {program}: pinning its link at {path} failed")]
    PinLink { program: &'static str, path: PathBuf, source: Box<aya::pin::PinError> },
    #[error("program {program}: its tc attachment is not a tcx link (kernel 6.6+ needed)")]
    Link { program: &'static str, source: Box<aya::programs::links::LinkError> },
    #[error("program {program} is missing from the object")]
    MissingProgram { program: &'static str },
    #[error("map {map}: {call} failed")]
    Map { map: &'static str, call: &'static str, source: Box<MapError> },
    #[error("map {map} is full ({max} entries): raise --bpf-lb-map-max")]
    MapFull { map: &'static str, max: u32 },
    #[error(
        "map {map} pinned at {path} has {pinned} entries but {wanted} were asked (--bpf-lb-map-max): \
         remove the pins (switch to iptables mode once, or rm -r the pin directory) to resize"
    )]
    PinnedSize { map: &'static str, path: PathBuf, pinned: u32, wanted: u32 },
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A map ran out of entries (the caller counts these in a metric).
    pub fn is_map_full(&self) -> bool {
        matches!(self, Error::MapFull { .. })
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

/// Where and how big.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The cgroup v2 directory whose processes (and their descendants' cgroups) get socket LB.
    pub cgroup: PathBuf,
    /// bpffs directory for the maps and `links/` (e.g. `/sys/fs/bpf/weft/<node>`).
    pub pin_dir: PathBuf,
    /// Entries of every LB map.
    pub map_max: u32,
}

/// Is `path` (or, if it does not exist yet, its nearest existing ancestor) on bpffs?
pub fn on_bpffs(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(cur) = p {
        if cur.exists() {
            return statfs_magic(cur) == Some(BPF_FS_MAGIC);
        }
        p = cur.parent();
    }
    false
}

fn statfs_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a writable statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_type as i64)
}

/// The loaded, attached and pinned socket LB. Dropping it leaves everything in place (pins hold it).
pub struct SockLb {
    pub maps: LbMaps,
    pin_dir: PathBuf,
}

impl SockLb {
    /// Loads the programs, re-using maps already pinned in `cfg.pin_dir`, attaches them to `cfg.cgroup`
    /// and pins the links. A previous instance's links are replaced only once the new ones are
    /// attached, so there is no moment without translation.
    pub fn load(cfg: &Config) -> Result<SockLb> {
        if !on_bpffs(&cfg.pin_dir) {
            return Err(Error::NotBpffs { path: cfg.pin_dir.clone() });
        }
        let links = cfg.pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links).map_err(io_err("creating", &links))?;
        let mut loader = EbpfLoader::new();
        loader.map_pin_path(&cfg.pin_dir);
        for m in [MAP_SERVICES, MAP_BACKENDS, MAP_AFFINITY, MAP_REVNAT] {
            loader.set_max_entries(m, cfg.map_max);
        }
        let mut obj = loader
            .load(SOCK_LB_OBJECT)
            .map_err(|source| Error::Load { pin_dir: cfg.pin_dir.clone(), source: Box::new(source) })?;

        let cgroup = File::open(&cfg.cgroup).map_err(io_err("opening the cgroup", &cfg.cgroup))?;
        for (program, attach_type, _) in PROGRAMS {
            let prog: &mut CgroupSockAddr = obj
                .program_mut(program)
                .ok_or(Error::MissingProgram { program })?
                .try_into()
                .map_err(|source| Error::Program { program, call: "program type", source: Box::new(source) })?;
            prog.load().map_err(|source| Error::Program {
                program,
                call: "BPF_PROG_LOAD",
                source: Box::new(source),
            })?;
            let fd =
                prog.fd().map_err(|source| Error::Program { program, call: "program fd", source: Box::new(source) })?;
            let link = sys::link_create(fd.as_fd(), cgroup.as_fd(), attach_type).map_err(|source| Error::Attach {
                program,
                call: "BPF_LINK_CREATE",
                path: cfg.cgroup.clone(),
                source,
            })?;
            let pin = links.join(program);
            // bpffs reserves names with a dot.
            let fresh = links.join(format!("{program}_new"));
            let _ = std::fs::remove_file(&fresh);
            sys::obj_pin(link.as_fd(), &fresh).map_err(|source| Error::Attach {
                program,
                call: "BPF_OBJ_PIN",
                path: fresh.clone(),
                source,
            })?;
            // Unpinning the old link detaches it (its owner exited); the new one is already attached.
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("unpinning the previous link", &pin)(e)),
            }
            std::fs::rename(&fresh, &pin).map_err(io_err("renaming the link pin", &fresh))?;
        }
        let maps = LbMaps::from_object(&mut obj, &cfg.pin_dir, cfg.map_max)?;
        Ok(SockLb { maps, pin_dir: cfg.pin_dir.clone() })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// What `remove` took away.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    pub links: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
}

/// Detaches (by unpinning the links) and unpins the maps under `pin_dir`, then removes the directory.
/// Only weft's own names are touched; a missing directory is not an error.
pub fn remove(pin_dir: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let links = pin_dir.join(LINKS_DIR);
    let programs = PROGRAMS.iter().map(|p| p.0).chain(NODEPORT_PROGRAMS.iter().map(|p| p.0));
    for program in programs {
        for name in [program.to_string(), format!("{program}_new")] {
            let p = links.join(name);
            match std::fs::remove_file(&p) {
                Ok(()) => removed.links.push(p),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("unpinning", &p)(e)),
            }
        }
    }
    for map in MAPS {
        let p = pin_dir.join(map);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.maps.push(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("unpinning", &p)(e)),
        }
    }
    for dir in [links.as_path(), pin_dir] {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing (is something else pinned there?)", dir)(e)),
        }
    }
    Ok(removed)
}

/// Where north-south balancing runs: the interface and the node address on it (SNAT source, NodePort
/// destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePort {
    pub interface: String,
    pub node_ip: std::net::Ipv4Addr,
}

/// Names of the tcx programs attached to `interface` (ingress, then egress), in this thread's namespace
/// (bpftool 7.1 does not list tcx yet).
pub fn tcx_programs(interface: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, progs) = SchedClassifier::query_tcx(interface, attach_type).map_err(|source| Error::Tc {
            program: "tcx query",
            interface: interface.to_string(),
            source: Box::new(source),
        })?;
        names.extend(progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()));
    }
    Ok(names)
}

/// The first IPv4 address of `interface` (in the calling thread's network namespace).
pub fn interface_ipv4(interface: &str) -> Option<std::net::Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        if a.interface_name != interface {
            return None;
        }
        a.address.as_ref()?.as_sockaddr_in().map(|sin| sin.ip())
    })
}

/// Every (interface, IPv4 address) pair of this network namespace.
pub fn interfaces_ipv4() -> Vec<(String, std::net::Ipv4Addr)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs.filter_map(|a| Some((a.interface_name.clone(), a.address.as_ref()?.as_sockaddr_in()?.ip()))).collect()
}

/// Replaces the link pinned at `links/<program>` by `link`: the new one is attached before the old goes.
fn replace_pin(links: &Path, program: &'static str, link: FdLink) -> Result<()> {
    let pin = links.join(program);
    let fresh = links.join(format!("{program}_new"));
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|source| Error::PinLink { program, path: fresh.clone(), source: Box::new(source) })?;
    match std::fs::remove_file(&pin) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("unpinning the previous link", &pin)(e)),
    }
    std::fs::rename(&fresh, &pin).map_err(io_err("renaming the link pin", &fresh))
}

/// Loads the north-south programs (sharing the pinned service maps of `cfg.pin_dir`), attaches them to
/// `np.interface` (tcx ingress and egress) and pins their links; `None` detaches what an earlier run
/// attached.
pub fn attach_nodeport(cfg: &Config, np: Option<&NodePort>) -> Result<()> {
    let links = cfg.pin_dir.join(LINKS_DIR);
    let Some(np) = np else {
        for (program, _) in NODEPORT_PROGRAMS {
            let p = links.join(program);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("unpinning", &p)(e)),
            }
        }
        return Ok(());
    };
    std::fs::create_dir_all(&links).map_err(io_err("creating", &links))?;
    let node_ip = u32::from(np.node_ip).to_be();
    let mut loader = EbpfLoader::new();
    loader.map_pin_path(&cfg.pin_dir);
    for m in [MAP_SERVICES, MAP_BACKENDS, MAP_CT] {
        loader.set_max_entries(m, cfg.map_max);
    }
    loader.set_global("NODE_IP", &node_ip, true);
    let mut obj = loader
        .load(NODEPORT_OBJECT)
        .map_err(|source| Error::Load { pin_dir: cfg.pin_dir.clone(), source: Box::new(source) })?;
    for (program, attach_type) in NODEPORT_PROGRAMS {
        let prog: &mut SchedClassifier = obj
            .program_mut(program)
            .ok_or(Error::MissingProgram { program })?
            .try_into()
            .map_err(|source| Error::Program { program, call: "program type", source: Box::new(source) })?;
        prog.load().map_err(|source| Error::Program { program, call: "BPF_PROG_LOAD", source: Box::new(source) })?;
        let id = prog.attach(&np.interface, attach_type).map_err(|source| Error::Tc {
            program,
            interface: np.interface.clone(),
            source: Box::new(source),
        })?;
        let link = prog.take_link(id).map_err(|source| Error::Program {
            program,
            call: "taking the link",
            source: Box::new(source),
        })?;
        let link = FdLink::try_from(link).map_err(|source| Error::Link { program, source: Box::new(source) })?;
        replace_pin(&links, program, link)?;
    }
    Ok(())
}

/// Link pins present under `pin_dir` (what `remove` would detach).
pub fn pinned_links(pin_dir: &Path) -> Vec<PathBuf> {
    PROGRAMS.iter().map(|(p, _, _)| pin_dir.join(LINKS_DIR).join(p)).filter(|p| p.exists()).collect()
}

/// The services and backends maps, typed.
pub struct LbMaps {
    services: HashMap<MapData, SvcKey, SvcVal>,
    backends: HashMap<MapData, BackendKey, Backend>,
    max_entries: u32,
}

fn typed<K: aya::Pod, V: aya::Pod>(map: &'static str, m: Map) -> Result<HashMap<MapData, K, V>> {
    HashMap::try_from(m).map_err(|source| Error::Map { map, call: "typing the map", source: Box::new(source) })
}

fn map_max(map: &'static str, data: &MapData) -> Result<u32> {
    data.info().map(|i| i.max_entries()).map_err(|source| Error::Map {
        map,
        call: "BPF_OBJ_GET_INFO_BY_FD",
        source: Box::new(source),
    })
}

impl LbMaps {
    fn from_object(obj: &mut aya::Ebpf, pin_dir: &Path, wanted: u32) -> Result<LbMaps> {
        let mut take = |map: &'static str| -> Result<Map> {
            let m = obj.take_map(map).ok_or(Error::Map {
                map,
                call: "finding the map",
                source: Box::new(MapError::KeyNotFound),
            })?;
            let data = match &m {
                Map::HashMap(d) | Map::LruHashMap(d) => d,
                _ => return Err(Error::Map { map, call: "map type", source: Box::new(MapError::KeyNotFound) }),
            };
            let pinned = map_max(map, data)?;
            if pinned != wanted {
                return Err(Error::PinnedSize { map, path: pin_dir.join(map), pinned, wanted });
            }
            Ok(m)
        };
        let services = typed(MAP_SERVICES, take(MAP_SERVICES)?)?;
        let backends = typed(MAP_BACKENDS, take(MAP_BACKENDS)?)?;
        for m in [MAP_AFFINITY, MAP_REVNAT] {
            take(m)?;
        }
        Ok(LbMaps { services, backends, max_entries: wanted })
    }

    /// Opens the maps another process pinned (for inspection and tests).
    pub fn open_pinned(pin_dir: &Path) -> Result<LbMaps> {
        let open = |map: &'static str| -> Result<(Map, u32)> {
            let data = MapData::from_pin(pin_dir.join(map)).map_err(|source| Error::Map {
                map,
                call: "BPF_OBJ_GET",
                source: Box::new(source),
            })?;
            let max = map_max(map, &data)?;
            Ok((Map::HashMap(data), max))
        };
        let (s, max_entries) = open(MAP_SERVICES)?;
        let (b, _) = open(MAP_BACKENDS)?;
        Ok(LbMaps { services: typed(MAP_SERVICES, s)?, backends: typed(MAP_BACKENDS, b)?, max_entries })
    }

    /// Entries each map holds at most.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Reads both maps.
    pub fn dump(&self) -> Result<MapState> {
        let mut state = MapState::default();
        for k in self.services.keys() {
            let map = MAP_SERVICES;
            let k = k.map_err(|source| Error::Map { map, call: "bpf_map_get_next_key", source: Box::new(source) })?;
            match self.services.get(&k, 0) {
                Ok(v) => {
                    state.services.insert(k, v);
                }
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(Error::Map { map, call: "bpf_map_lookup_elem", source: Box::new(source) }),
            }
        }
        for k in self.backends.keys() {
            let map = MAP_BACKENDS;
            let k = k.map_err(|source| Error::Map { map, call: "bpf_map_get_next_key", source: Box::new(source) })?;
            match self.backends.get(&k, 0) {
                Ok(v) => {
                    state.backends.insert(k, v);
                }
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(Error::Map { map, call: "bpf_map_lookup_elem", source: Box::new(source) }),
            }
        }
        Ok(state)
    }

    /// One write. Deleting what is not there is not an error (idempotent re-runs).
    pub fn apply(&mut self, op: &MapOp) -> Result<()> {
        let map = op.map();
        let max = self.max_entries;
        let update = |r: std::result::Result<(), MapError>| match r {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Err(Error::MapFull { map, max })
            }
            Err(source) => Err(Error::Map { map, call: "bpf_map_update_elem", source: Box::new(source) }),
        };
        let delete = |r: std::result::Result<(), MapError>| match r {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map { map, call: "bpf_map_delete_elem", source: Box::new(source) }),
        };
        match op {
            MapOp::PutBackend(k, v) => update(self.backends.insert(k, v, 0)),
            MapOp::PutService(k, v) => update(self.services.insert(k, v, 0)),
            MapOp::DeleteBackend(k) => delete(self.backends.remove(k)),
            MapOp::DeleteService(k) => delete(self.services.remove(k)),
        }
    }
}
