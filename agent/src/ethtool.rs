//! The one ethtool operation the overlay needs: switching a netdev feature (such as
//! `tx-checksum-ip-generic` on `flannel.<vni>`) off through the SIOCETHTOOL ioctl, by feature name.
//! The ioctl socket is opened on the calling thread, so it acts on that thread's network namespace.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// The feature flannel turns off on its VXLAN device: with it on, some kernels send VXLAN packets
/// with bad inner checksums that the peer drops (flannel issue #1279).
pub const TX_CHECKSUM_IP_GENERIC: &str = "tx-checksum-ip-generic";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{call}` on {iface} failed: {source}")]
    Syscall { call: &'static str, iface: String, source: io::Error },
    #[error("interface name {0:?} is too long for an ifreq")]
    BadName(String),
    #[error("{iface} has no ethtool feature {feature:?}")]
    UnknownFeature { iface: String, feature: String },
    #[error("{iface}: the kernel refused to change {feature:?} (it is not changeable on this device)")]
    Fixed { iface: String, feature: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `struct ifreq` with the `ifr_data` member of its union (40 bytes on 64-bit Linux).
#[repr(C)]
struct Ifreq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut c_void,
    _pad: [u8; 16],
}

struct Ethtool {
    sock: OwnedFd,
    iface: String,
}

impl Ethtool {
    fn open(iface: &str) -> Result<Ethtool> {
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
            return Err(Error::BadName(iface.into()));
        }
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::Syscall { call: "socket", iface: iface.into(), source: io::Error::last_os_error() });
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Ethtool { sock, iface: iface.into() })
    }

    /// Runs one ETHTOOL_* command whose request/reply struct is `buf` (u32-aligned, cmd first).
    fn ioctl(&self, call: &'static str, buf: &mut [u32]) -> Result<i32> {
        let mut req = Ifreq { name: [0; libc::IFNAMSIZ], data: buf.as_mut_ptr().cast(), _pad: [0; 16] };
        req.name[..self.iface.len()].copy_from_slice(self.iface.as_bytes());
        // SAFETY: `req` names a NUL-terminated interface and points at `buf`, which is sized by the
        // caller for the command's struct including its trailing array; both outlive the call.
        let rc = unsafe { libc::ioctl(self.sock.as_raw_fd(), SIOCETHTOOL, &mut req as *mut Ifreq) };
        if rc < 0 {
            return Err(Error::Syscall { call, iface: self.iface.clone(), source: io::Error::last_os_error() });
        }
        Ok(rc)
    }

    /// Names of the device's features, in bit order.
    fn feature_names(&self) -> Result<Vec<String>> {
        // struct ethtool_sset_info { u32 cmd; u32 reserved; u64 sset_mask; u32 data[]; }
        let mask = 1u64 << ETH_SS_FEATURES;
        let mut info = [0u32; 6];
        info[0] = ETHTOOL_GSSET_INFO;
        set_u64(&mut info[2..4], mask);
        self.ioctl("ETHTOOL_GSSET_INFO", &mut info)?;
        // The kernel clears the mask bit of a string set the device does not have.
        let count = if get_u64(&info[2..4]) & mask != 0 { info[4] as usize } else { 0 };
        // struct ethtool_gstrings { u32 cmd; u32 string_set; u32 len; u8 data[]; }
        let mut strings = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
        strings[0] = ETHTOOL_GSTRINGS;
        strings[1] = ETH_SS_FEATURES;
        strings[2] = count as u32;
        self.ioctl("ETHTOOL_GSTRINGS", &mut strings)?;
        let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(bytes
            .chunks(ETH_GSTRING_LEN)
            .map(|c| String::from_utf8_lossy(c.split(|b| *b == 0).next().unwrap_or_default()).into_owned())
            .collect())
    }

    /// `active` bits of every feature block (struct ethtool_get_features_block).
    fn active(&self, blocks: usize) -> Result<Vec<u32>> {
        // struct ethtool_gfeatures { u32 cmd; u32 size; { available, requested, active, never_changed }[] }
        let mut g = vec![0u32; 2 + 4 * blocks];
        g[0] = ETHTOOL_GFEATURES;
        g[1] = blocks as u32;
        self.ioctl("ETHTOOL_GFEATURES", &mut g)?;
        Ok((0..blocks).map(|b| g[2 + 4 * b + 2]).collect())
    }
}

fn set_u64(words: &mut [u32], v: u64) {
    let b = v.to_ne_bytes();
    words[0] = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    words[1] = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
}

fn get_u64(words: &[u32]) -> u64 {
    let (a, b) = (words[0].to_ne_bytes(), words[1].to_ne_bytes());
    u64::from_ne_bytes([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]])
}

/// Opens `iface` and finds `feature`'s bit: (handle, bit index, number of 32-bit feature blocks).
fn lookup(iface: &str, feature: &str) -> Result<(Ethtool, usize, usize)> {
    let e = Ethtool::open(iface)?;
    let names = e.feature_names()?;
    let bit = names
        .iter()
        .position(|n| n == feature)
        .ok_or_else(|| Error::UnknownFeature { iface: iface.into(), feature: feature.into() })?;
    Ok((e, bit, names.len().div_ceil(32)))
}

/// Whether `feature` is currently on for `iface`.
pub fn feature_active(iface: &str, feature: &str) -> Result<bool> {
    let (e, bit, blocks) = lookup(iface, feature)?;
    Ok(e.active(blocks)?[bit / 32] & (1 << (bit % 32)) != 0)
}

/// Turns `feature` on or off on `iface`, like `ethtool -K <iface> <feature> on|off`.
/// Returns whether it had to change anything.
pub fn set_feature(iface: &str, feature: &str, on: bool) -> Result<bool> {
    let (e, bit, blocks) = lookup(iface, feature)?;
    let (word, mask) = (bit / 32, 1u32 << (bit % 32));
    let is_on = |active: &[u32]| active[word] & mask != 0;
    if is_on(&e.active(blocks)?) == on {
        return Ok(false);
    }
    // struct ethtool_sfeatures { u32 cmd; u32 size; { valid, requested }[] }: only our bit is valid.
    let mut s = vec![0u32; 2 + 2 * blocks];
    s[0] = ETHTOOL_SFEATURES;
    s[1] = blocks as u32;
    s[2 + 2 * word] = mask;
    if on {
        s[3 + 2 * word] = mask;
    }
    e.ioctl("ETHTOOL_SFEATURES", &mut s)?;
    // A positive reply only says "not everything as wished"; what counts is the active bit.
    if is_on(&e.active(blocks)?) != on {
        return Err(Error::Fixed { iface: iface.into(), feature: feature.into() });
    }
    Ok(true)
}
