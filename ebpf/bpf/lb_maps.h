/* The service and backend maps both programs share (pinned by name, so the socket LB and the tc programs read
 * one copy): defined once here so their definitions cannot drift apart. Include after lb.h and bpf_helpers.h.
 *
 * Hash maps without preallocation: a replaced value is freed after an RCU grace period, so a reader
 * racing an update sees the old or the new service entry, never a mix. */
#ifndef WEFT_LB_MAPS_H
#define WEFT_LB_MAPS_H

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAP_MAX_DEFAULT);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAP_MAX_DEFAULT);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb_backend_key);
	__type(value, struct lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb_be SEC(".maps");

#endif
