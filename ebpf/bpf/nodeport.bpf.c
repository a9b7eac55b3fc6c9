// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* North-south load balancing on --nodeport-interface (tc clsact): a packet for a node port (on the node
 * address) or an external IP is sent to a backend: DNAT, plus SNAT to the node address when the backend is
 * on another node (then redirected out after a FIB lookup, as the kernel would drop a packet arriving with
 * a local source). The reply is translated back: remote backends' replies at ingress, local ones' at
 * egress. externalTrafficPolicy Local uses local backends only and never SNATs. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "lb.h"

#define AF_INET 2
#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_SRC_OFF (IP_OFF + 12)
#define IP_DST_OFF (IP_OFF + 16)
#define L4_OFF (IP_OFF + 20)
#define LOCAL_SCAN 32

/* The node address (network order), set by the loader. */
volatile const __u32 NODE_IP = 0;

#include "lb_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_MAP_MAX_DEFAULT);
	__type(key, struct lb_ct_key);
	__type(value, struct lb_ct_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_ct SEC(".maps");

struct pkt {
	__u32 src, dst;
	__u16 sport, dport;
	__u8 proto;
	int csum_off;
	__u64 flags; /* BPF_F_MARK_MANGLED_0 for UDP */
};

/* IPv4 TCP/UDP without IP options, not a fragment. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return 0;
	__u16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > end)
		return 0;
	p->src = ip->saddr;
	p->dst = ip->daddr;
	p->proto = ip->protocol;
	p->sport = ports[0];
	p->dport = ports[1];
	if (ip->protocol == IPPROTO_TCP) {
		p->csum_off = L4_OFF + offsetof(struct tcphdr, check);
		p->flags = 0;
	} else if (ip->protocol == IPPROTO_UDP) {
		p->csum_off = L4_OFF + offsetof(struct udphdr, check);
		p->flags = BPF_F_MARK_MANGLED_0;
	} else {
		return 0;
	}
	return 1;
}

static __always_inline void set_addr(struct __sk_buff *skb, struct pkt *p, int off, __u32 old, __u32 new)
{
	bpf_l4_csum_replace(skb, p->csum_off, old, new, p->flags | BPF_F_PSEUDO_HDR | sizeof(new));
	bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new));
	bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

static __always_inline void set_port(struct __sk_buff *skb, struct pkt *p, int off, __u16 old, __u16 new)
{
	bpf_l4_csum_replace(skb, p->csum_off, old, new, p->flags | sizeof(new));
	bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* Sends the rewritten packet where the routing table says, with the right MACs. */
static __always_inline int redirect(struct __sk_buff *skb, struct pkt *p, __u32 src, __u32 dst)
{
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.l4_protocol = p->proto;
	/* tot_len 0: the kernel checks the MTU against the skb itself, which knows GSO packets (a TSO
	 * packet from a veth is up to 64 KiB and would otherwise be refused as "fragmentation needed"). */
	fib.tot_len = 0;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = skb->ifindex;
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;
	bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0);
	bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0);
	return bpf_redirect(fib.ifindex, 0);
}

static __always_inline struct lb_backend *pick(struct lb_svc_val *svc)
{
	struct lb_backend_key bkey = { .id = svc->id };
	__u32 count = svc->count;
	if (!(svc->flags & LB_FLAG_LOCAL_ONLY)) {
		bkey.slot = bpf_get_prandom_u32() % count;
		return bpf_map_lookup_elem(&weft_lb_be, &bkey);
	}
	/* Local only: from a random slot, the first local backend among the next LOCAL_SCAN. */
	__u32 start = bpf_get_prandom_u32() % count;
	for (int i = 0; i < LOCAL_SCAN; i++) {
		if (i >= count)
			break;
		bkey.slot = (start + i) % count;
		struct lb_backend *be = bpf_map_lookup_elem(&weft_lb_be, &bkey);
		if (be && (be->flags & LB_BE_LOCAL))
			return be;
	}
	return 0;
}

SEC("classifier")
int weft_nodeport_in(struct __sk_buff *skb)
{
	struct pkt p = {};
	if (!parse(skb, &p))
		return TC_ACT_OK;

	/* The reply of a remote backend to the node address: back to the client, from the frontend. */
	if (p.dst == NODE_IP) {
		struct lb_ct_key rkey = { .src = p.src, .dst = p.dst, .sport = p.sport, .dport = p.dport, .proto = p.proto, .dir = 1 };
		struct lb_ct_val *r = bpf_map_lookup_elem(&weft_lb_ct, &rkey);
		if (r && r->snat) {
			__u32 faddr = r->addr1, caddr = r->addr2;
			__u16 fport = r->port1, cport = r->port2;
			set_addr(skb, &p, IP_SRC_OFF, p.src, faddr);
			set_addr(skb, &p, IP_DST_OFF, p.dst, caddr);
			set_port(skb, &p, L4_OFF, p.sport, fport);
			set_port(skb, &p, L4_OFF + 2, p.dport, cport);
			return redirect(skb, &p, faddr, caddr);
		}
	}

	struct lb_ct_key fkey = { .src = p.src, .dst = p.dst, .sport = p.sport, .dport = p.dport, .proto = p.proto, .dir = 0 };
	struct lb_ct_val *f = bpf_map_lookup_elem(&weft_lb_ct, &fkey);
	struct lb_ct_val fwd = {};
	if (f) {
		fwd = *f;
	} else {
		struct lb_svc_key key = { .vip = p.dst, .port = p.dport, .proto = p.proto, .scope = LB_SCOPE_SOCKET };
		if (p.dst == NODE_IP) {
			key.vip = 0;
			key.scope = LB_SCOPE_NODEPORT;
		}
		struct lb_svc_val *svc = bpf_map_lookup_elem(&weft_lb_svc, &key);
		if (!svc)
			return TC_ACT_OK;
		if (svc->count == 0)
			return TC_ACT_SHOT;
		struct lb_backend *be = pick(svc);
		if (!be)
			return TC_ACT_SHOT;
		fwd.addr1 = be->ip;
		fwd.port1 = be->port;
		fwd.snat = !(be->flags & LB_BE_LOCAL) && !(svc->flags & LB_FLAG_LOCAL_ONLY);
		bpf_map_update_elem(&weft_lb_ct, &fkey, &fwd, BPF_ANY);
		struct lb_ct_key rkey = {
			.src = fwd.addr1,
			.dst = fwd.snat ? NODE_IP : p.src,
			.sport = fwd.port1,
			.dport = p.sport,
			.proto = p.proto,
			.dir = 1,
		};
		struct lb_ct_val rev = { .addr1 = p.dst, .port1 = p.dport, .addr2 = p.src, .port2 = p.sport, .snat = fwd.snat };
		bpf_map_update_elem(&weft_lb_ct, &rkey, &rev, BPF_ANY);
	}
	set_addr(skb, &p, IP_DST_OFF, p.dst, fwd.addr1);
	set_port(skb, &p, L4_OFF + 2, p.dport, fwd.port1);
	if (!fwd.snat)
		return TC_ACT_OK; /* a local backend: the kernel routes it to the pod */
	set_addr(skb, &p, IP_SRC_OFF, p.src, NODE_IP);
	return redirect(skb, &p, NODE_IP, fwd.addr1);
}

SEC("classifier")
int weft_nodeport_out(struct __sk_buff *skb)
{
	struct pkt p = {};
	if (!parse(skb, &p))
		return TC_ACT_OK;
	/* A local backend's reply on its way to the client: from the frontend. */
	struct lb_ct_key rkey = { .src = p.src, .dst = p.dst, .sport = p.sport, .dport = p.dport, .proto = p.proto, .dir = 1 };
	struct lb_ct_val *r = bpf_map_lookup_elem(&weft_lb_ct, &rkey);
	if (!r || r->snat)
		return TC_ACT_OK;
	__u32 faddr = r->addr1;
	__u16 fport = r->port1;
	set_addr(skb, &p, IP_SRC_OFF, p.src, faddr);
	set_port(skb, &p, L4_OFF, p.sport, fport);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
