// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* East-west, socket-level service load balancing: cgroup v2 sock_addr hooks rewrite a VIP:port to a
 * backend when a socket connects (TCP, UDP) or sends (unconnected UDP), and rewrite the backend back to the
 * VIP for UDP replies and getpeername(), so applications see the address they asked for. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "lb.h"

#define ECONNREFUSED 111
#define NSEC_PER_SEC 1000000000ULL

#include "lb_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_MAP_MAX_DEFAULT);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_aff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_MAP_MAX_DEFAULT);
	__type(key, struct lb_rnat_key);
	__type(value, struct lb_rnat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_rnat SEC(".maps");

/* Picks a backend for the service behind ctx's destination and rewrites the destination.
 * Returns 1 to let the call proceed, 0 to fail it (with ECONNREFUSED when the service has no backend). */
static __always_inline int translate(struct bpf_sock_addr *ctx, __u8 proto)
{
	struct lb_svc_key key = {
		.vip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
		.proto = proto,
		.scope = LB_SCOPE_SOCKET,
	};
	struct lb_svc_val *found = bpf_map_lookup_elem(&weft_lb_svc, &key);
	if (!found)
		return 1; /* not a service address */
	/* One copy of the entry: count and id must come from the same version. */
	struct lb_svc_val svc = *found;
	if (svc.count == 0) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}

	struct lb_backend_key bkey = { .id = svc.id };
	struct lb_backend *be = 0;
	struct lb_affinity_key akey = {};
	__u64 now = 0;
	if (svc.flags & LB_FLAG_AFFINITY) {
		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		akey.id = svc.id;
		now = bpf_ktime_get_ns();
		struct lb_affinity_val *aff = bpf_map_lookup_elem(&weft_lb_aff, &akey);
		if (aff && aff->slot < svc.count && now - aff->last_used_ns <= (__u64)svc.affinity_secs * NSEC_PER_SEC) {
			bkey.slot = aff->slot;
			be = bpf_map_lookup_elem(&weft_lb_be, &bkey);
			/* The slot may hold another backend since: then choose again. */
			if (be && (be->ip != aff->ip || be->port != aff->port))
				be = 0;
		}
	}
	if (!be) {
		bkey.slot = bpf_get_prandom_u32() % svc.count;
		be = bpf_map_lookup_elem(&weft_lb_be, &bkey);
	}
	if (!be) {
		/* The service shrank between our two lookups: read it again, once. */
		found = bpf_map_lookup_elem(&weft_lb_svc, &key);
		if (found && found->count > 0) {
			bkey.id = found->id;
			bkey.slot = bpf_get_prandom_u32() % found->count;
			be = bpf_map_lookup_elem(&weft_lb_be, &bkey);
		}
	}
	if (!be) {
		/* Only if the loader broke its write order; refuse rather than send to the VIP. */
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	__u32 ip = be->ip;
	__u16 port = be->port;
	if (svc.flags & LB_FLAG_AFFINITY) {
		struct lb_affinity_val aval = { .last_used_ns = now, .ip = ip, .port = port, .slot = (__u16)bkey.slot };
		bpf_map_update_elem(&weft_lb_aff, &akey, &aval, BPF_ANY);
	}
	struct lb_rnat_key rkey = { .cookie = bpf_get_socket_cookie(ctx), .ip = ip, .port = port };
	struct lb_rnat_val rval = { .vip = key.vip, .port = key.port };
	bpf_map_update_elem(&weft_lb_rnat, &rkey, &rval, BPF_ANY);

	ctx->user_ip4 = ip;
	ctx->user_port = port;
	return 1;
}

/* Backend -> VIP for what the application reads back (a UDP reply's source, getpeername). */
static __always_inline int reverse(struct bpf_sock_addr *ctx)
{
	struct lb_rnat_key rkey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct lb_rnat_val *rval = bpf_map_lookup_elem(&weft_lb_rnat, &rkey);
	if (rval) {
		ctx->user_ip4 = rval->vip;
		ctx->user_port = rval->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int weft_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	return translate(ctx, (__u8)ctx->protocol);
}

SEC("cgroup/sendmsg4")
int weft_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, IPPROTO_UDP);
}

SEC("cgroup/recvmsg4")
int weft_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx);
}

SEC("cgroup/getpeername4")
int weft_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
