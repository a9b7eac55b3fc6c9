//! A UDP socket that answers from the address each query was sent to. A socket bound to the wildcard
//! address would otherwise reply from whatever source the route picks (on a node: the bridge's address,
//! not the one the pod asked, nor the one the proxy DNATed to), and the client or conntrack drops the
//! answer. The destination comes in with `IP_PKTINFO`/`IPV6_PKTINFO` and goes back out as the source.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

pub struct PktSocket {
    sock: UdpSocket,
    /// Bound to the wildcard address: track each query's destination.
    pktinfo: bool,
}

/// Control-message space for one pktinfo, 8-byte aligned.
type Cbuf = [u64; 8];

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The IP socket address in a `sockaddr_storage` the kernel filled.
fn sockaddr(a: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family says which struct the storage holds; both fit in sockaddr_storage.
    unsafe {
        match libc::c_int::from(a.ss_family) {
            libc::AF_INET => {
                let v4: libc::sockaddr_in = std::ptr::read_unaligned((a as *const libc::sockaddr_storage).cast());
                Some(SocketAddr::from((Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)), u16::from_be(v4.sin_port))))
            }
            libc::AF_INET6 => {
                let v6: libc::sockaddr_in6 = std::ptr::read_unaligned((a as *const libc::sockaddr_storage).cast());
                let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip,
                    u16::from_be(v6.sin6_port),
                    v6.sin6_flowinfo,
                    v6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

impl PktSocket {
    pub fn new(sock: UdpSocket) -> io::Result<PktSocket> {
        let local = sock.local_addr()?;
        let pktinfo = local.ip().is_unspecified();
        if pktinfo {
            let fd = sock.as_raw_fd();
            match local {
                SocketAddr::V4(_) => setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO)?,
                SocketAddr::V6(_) => {
                    setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
                    // A v6 wildcard socket also gets v4 (mapped) queries; their destination comes as IP_PKTINFO.
                    let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO);
                }
            }
        }
        Ok(PktSocket { sock, pktinfo })
    }

    /// One datagram: its length, sender and the local address it was sent to (when tracked).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        if !self.pktinfo {
            let (n, peer) = self.sock.recv_from(buf)?;
            return Ok((n, peer, None));
        }
        // SAFETY: every pointer in `msg` refers to a live local buffer of the stated size; the kernel writes
        // at most that much; control messages are read with the CMSG_* accessors within msg_controllen.
        unsafe {
            let mut addr: libc::sockaddr_storage = zeroed();
            let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
            let mut cbuf: Cbuf = [0; 8];
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = size_of::<Cbuf>();
            let n = libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let peer = sockaddr(&addr)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sender is not an IP address"))?;
            let mut local = None;
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
                if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                    let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
                } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                    let info: libc::in6_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            Ok((n as usize, peer, local))
        }
    }

    /// Sends `buf` to `peer`, from `local` when given.
    pub fn send(&self, buf: &[u8], peer: SocketAddr, local: Option<IpAddr>) -> io::Result<usize> {
        let Some(local) = local.filter(|_| self.pktinfo) else {
            return self.sock.send_to(buf, peer);
        };
        let dest = socket2::SockAddr::from(peer);
        // SAFETY: as in `recv`; the control message is built with CMSG_* inside `cbuf`, which is large and
        // aligned enough for one in_pktinfo or in6_pktinfo.
        unsafe {
            let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
            let mut cbuf: Cbuf = [0; 8];
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = dest.as_ptr() as *mut libc::c_void;
            msg.msg_namelen = dest.len();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            let (level, kind, len) = match local {
                IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, size_of::<libc::in_pktinfo>()),
                IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, size_of::<libc::in6_pktinfo>()),
            };
            msg.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
            match local {
                IpAddr::V4(v4) => {
                    let mut info: libc::in_pktinfo = zeroed();
                    info.ipi_spec_dst.s_addr = u32::from(v4).to_be();
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                }
                IpAddr::V6(v6) => {
                    let mut info: libc::in6_pktinfo = zeroed();
                    info.ipi6_addr.s6_addr = v6.octets();
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                }
            }
            let n = libc::sendmsg(self.sock.as_raw_fd(), &msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_socket_answers_from_the_address_asked() {
        let server = PktSocket::new(UdpSocket::bind("0.0.0.0:0").unwrap()).unwrap();
        let port = server.sock.local_addr().unwrap().port();
        // 127.0.0.2 is a loopback address too: the reply must come from it, not from 127.0.0.1.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        client.send_to(b"q", ("127.0.0.2", port)).unwrap();
        let mut buf = [0u8; 16];
        let (n, peer, local) = server.recv(&mut buf).unwrap();
        assert_eq!((&buf[..n], local), (&b"q"[..], Some("127.0.0.2".parse().unwrap())));
        server.send(b"a", peer, local).unwrap();
        let (_, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 2], port)));
    }
}
