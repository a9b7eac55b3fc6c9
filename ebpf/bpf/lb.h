/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* weft's load-balancer maps: every key and value the programs and the Rust loader share. The Rust side
 * mirrors these structs with #[repr(C)] types (ebpf/src/maps.rs) and a test checks them against this
 * object's BTF. Addresses and ports are in network byte order, as the kernel hands them over. */
#ifndef WEFT_LB_H
#define WEFT_LB_H

#include <linux/types.h>

/* Default entries of every LB map (--bpf-lb-map-max): at least 10,000 services x 10 endpoints. */
#define LB_MAP_MAX_DEFAULT 131072

/* lb_svc_val.flags */
#define LB_FLAG_AFFINITY (1 << 0)   /* ClientIP affinity: remember the backend per client (netns) */
#define LB_FLAG_LOCAL_ONLY (1 << 1) /* externalTrafficPolicy: Local (north-south only) */

/* lb_svc_key.scope */
#define LB_SCOPE_SOCKET 0   /* ClusterIP, externalIP, load-balancer IP: translated at connect/sendmsg */
#define LB_SCOPE_NODEPORT 1 /* a node port (vip = 0: any node address) */

/* weft_lb_svc: one frontend of a service port. */
struct lb_svc_key {
	__u32 vip;   /* network order */
	__u16 port;  /* network order */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 scope;  /* LB_SCOPE_* */
};

struct lb_svc_val {
	__u32 id;            /* the service port's id: the first half of its backends' keys */
	__u16 count;         /* ready backends in slots 0..count-1; 0 refuses the connection */
	__u16 flags;         /* LB_FLAG_* */
	__u32 affinity_secs; /* ClientIP affinity timeout (LB_FLAG_AFFINITY) */
};

/* weft_lb_be: the backend in one slot of a service. */
struct lb_backend_key {
	__u32 id;
	__u32 slot;
};

struct lb_backend {
	__u32 ip;    /* network order */
	__u16 port;  /* network order */
	__u8 flags;  /* LB_BE_LOCAL: the endpoint runs on this node */
	__u8 pad;
};
#define LB_BE_LOCAL (1 << 0)

/* weft_lb_aff (LRU): ClientIP affinity. A socket-level client is its network namespace (a pod). */
struct lb_affinity_key {
	__u64 netns_cookie;
	__u32 id;
	__u32 pad;
};

struct lb_affinity_val {
	__u64 last_used_ns; /* bpf_ktime_get_ns() of the last connection */
	__u32 ip;           /* the backend chosen, checked against its slot before reuse */
	__u16 port;
	__u16 slot;
};

/* weft_lb_rnat (LRU): per socket, backend -> the VIP the application asked for (UDP replies, getpeername). */
struct lb_rnat_key {
	__u64 cookie; /* bpf_get_socket_cookie() */
	__u32 ip;     /* backend, network order */
	__u16 port;
	__u16 pad;
};

struct lb_rnat_val {
	__u32 vip;
	__u16 port;
	__u16 pad;
};

/* weft_lb_ct (LRU): north-south connections, both directions. dir 0: client -> frontend (which backend);
 * dir 1: backend -> client or node address (the reply, to translate back). */
struct lb_ct_key {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

struct lb_ct_val {
	__u32 addr1; /* dir 0: backend; dir 1: frontend (the reply's new source) */
	__u32 addr2; /* dir 1: client (the reply's new destination) */
	__u16 port1;
	__u16 port2;
	__u8 snat;   /* the backend is remote: its traffic was source-NATed to the node address */
	__u8 pad[3];
};

#endif
