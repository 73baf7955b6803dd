//! The kernel side of tcpmon.
//!
//! The main program sits on `sock:inet_sock_set_state`. It counts every TCP transition in a
//! per-CPU array (so the counts stay exact when the ring buffer is full), copies the socket's
//! fields into a ring buffer entry, and submits it; at handshake completion and at CLOSE it
//! adds the socket's `tcp_sock` counters. It comes in two builds of the same logic: a BTF
//! tracepoint that reads the socket directly (preferred: no trace record is built, and its
//! loads are plain memory loads the verifier checks against the kernel's BTF), and a classic
//! tracepoint reading the trace record, for kernels where the BTF build does not load. Three small programs add facts the state tracepoint
//! cannot show: SYN-ACK retransmissions with the first SYN-ACK's time
//! (`tcp:tcp_retransmit_synack`) and resets sent and received (BTF tracepoints). A fourth, on
//! the exit of accept() and accept4(), notes which socket the application took from its
//! listener's queue, and when. All
//! interpretation happens in userspace, where unit tests reach it.
#![no_std]
#![no_main]

mod emit;
mod maps;
mod read;
mod socket;

use aya_ebpf::{
    helpers::generated,
    macros::{btf_tracepoint, fexit, tracepoint},
    programs::{BtfTracePointContext, FExitContext, TracePointContext},
};
use aya_log_ebpf::debug;
use monitor_common::{
    counter, log_kind, note, synack_layout as synack, syscall_exit_layout as syscall_exit,
    tracepoint_layout as tp, SynAckRetransmit, AF_INET, AF_INET6, IPPROTO_TCP,
};

use emit::{as_number, on_state_change, output, submit_note};
use maps::{may_log, offsets};
use read::{copy_addr_2aligned, field, Direct, Probe, Reader};
use socket::{write_addresses, write_synack_request, TraceRecord};

/// The classic build: fields come from the trace record the kernel fills for us.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: the loader verified these offsets against the event's `format` file; tracepoint
    // context loads at constant, aligned offsets are checked by the verifier.
    unsafe {
        let protocol: u16 = field(&ctx, tp::PROTOCOL);
        if protocol != IPPROTO_TCP {
            return 0;
        }
        let socket = TraceRecord { ctx: &ctx, skaddr: field(&ctx, tp::SKADDR) };
        on_state_change(&ctx, &socket, field(&ctx, tp::OLDSTATE), field(&ctx, tp::NEWSTATE));
    }
    0
}

/// The BTF build: `trace_inet_sock_set_state(sk, oldstate, newstate)`'s arguments, with the
/// socket's fields read from the socket itself. The kernel skips building the trace record
/// (`perf_trace_inet_sock_set_state`) for a raw attachment, and every read is a direct load.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let socket = Direct(sk);
    let offsets = offsets();
    // SAFETY: `sk` is the tracepoint's socket; the offsets come from this kernel's BTF and
    // the verifier checks every load against it (the loader falls back to the classic build
    // when it refuses).
    unsafe {
        let protocol: Option<u16> = socket.read(offsets.sk_protocol);
        if protocol != Some(IPPROTO_TCP) {
            return 0;
        }
        on_state_change(&ctx, &socket, ctx.arg(1), ctx.arg(2));
    }
    0
}

/// `tcp:tcp_retransmit_synack(listener, req)`: a request socket resent its SYN-ACK (timer,
/// or a retransmitted SYN). The request socket knows when its *first* SYN-ACK left
/// (`tcp_rsk(req)->snt_synack`); its child will carry the same 4-tuple. Rare, so its cost
/// does not matter. Two builds, as for the state program: [`tcp_retransmit_synack_btf`] reads
/// the request socket itself; this classic one reads the trace record, whose layout the
/// loader checked (Linux 5.10's record has no `family` and other offsets: there only the BTF
/// build runs).
#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let mut record = core::mem::MaybeUninit::<SynAckRetransmit>::uninit();
    let record = record.as_mut_ptr();
    // SAFETY: the loader verified the offsets against the event's `format` file.
    unsafe {
        let req: u64 = field(&ctx, synack::REQ);
        write_synack_request(record, req);
        (*record).sport = field(&ctx, synack::SPORT);
        (*record).dport = field(&ctx, synack::DPORT);
        (*record).family = field(&ctx, synack::FAMILY);
        copy_addr_2aligned(&ctx, synack::SADDR_V6, &mut (*record).saddr);
        copy_addr_2aligned(&ctx, synack::DADDR_V6, &mut (*record).daddr);
        output(&ctx, &*record, counter::NOTE_RESERVE_FAILED);
    }
    0
}

/// `tp_btf/tcp_retransmit_synack(listener, req)`: the same record as
/// [`tcp_retransmit_synack`], from the request socket's own `sock_common` (`struct
/// request_sock` starts with one, so a socket's field offsets serve), needing neither tracefs
/// nor a record layout. What the child socket's records will show: the listener's family
/// (a child of an IPv6 listener stays `AF_INET6` for an IPv4 peer), the addresses of the
/// request's own family, IPv4-mapped when that is `AF_INET`.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack_btf(ctx: BtfTracePointContext) -> u32 {
    let listener: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    let mut record = core::mem::MaybeUninit::<SynAckRetransmit>::uninit();
    let record = record.as_mut_ptr();
    let o = offsets();
    // SAFETY: reads go through bpf_probe_read_kernel, which fails safely.
    unsafe {
        write_synack_request(record, req);
        let req = Probe(req);
        let dport: u16 = req.read(o.skc_dport).unwrap_or(0);
        (*record).sport = req.read(o.skc_num).unwrap_or(0);
        (*record).dport = u16::from_be(dport);
        let family = Probe(listener).read(o.skc_family);
        if family.is_none() && may_log(log_kind::SYNACK_LISTENER) {
            debug!(
                &ctx,
                "the listener {:x} of request {:x} could not be read: its SYN-ACK \
                 retransmission carries no family",
                as_number(listener),
                as_number(req.0)
            );
        }
        (*record).family = family.unwrap_or(0);
        let ipv4 = req.read::<u16>(o.skc_family) == Some(AF_INET);
        write_addresses(&req, ipv4, o, &mut (*record).saddr, &mut (*record).daddr);
        output(&ctx, &*record, counter::NOTE_RESERVE_FAILED);
    }
    0
}

/// `tcp:tcp_send_reset(sk, skb[, reason])`: `sk` is NULL when no socket owns the segment
/// answered, and may be a listener or a timewait socket; userspace matches full sockets.
/// Only the first argument is read: `reason` exists since Linux 6.10, and the verifier
/// rejects reading an argument a kernel's tracepoint does not have.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    submit_note(&ctx, sk, note::RESET_SENT, 0);
    0
}

/// `tcp:tcp_receive_reset(sk)`, from `tcp_reset()` before `tcp_done()` closes the socket.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    submit_note(&ctx, sk, note::RESET_RECEIVED, 0);
    0
}

/// `fexit/inet_csk_accept`, Linux 6.10 and later (`inet_csk_accept(sk, arg)`, commit
/// 92ef0fd55ac8): the accept queue handed the socket it returns to the application, by any
/// route (accept(), accept4(), io_uring). The preferred hook: it costs nothing beyond the
/// accept itself, where the syscall tracepoints slow every system call on the host. Needs
/// BPF trampolines, which some hosts refuse.
#[fexit(function = "inet_csk_accept")]
pub fn inet_csk_accept_exit(ctx: FExitContext) -> u32 {
    accepted(&ctx, ctx.arg(2));
    0
}

/// `fexit/inet_csk_accept` before Linux 6.10 (`inet_csk_accept(sk, flags, err, kern)`): the
/// return value follows the four arguments.
#[fexit(function = "inet_csk_accept")]
pub fn inet_csk_accept_exit_before_6_10(ctx: FExitContext) -> u32 {
    accepted(&ctx, ctx.arg(4));
    0
}

/// Notes the socket `inet_csk_accept()` returned (NULL when it failed).
#[inline(always)]
fn accepted(ctx: &FExitContext, sk: *const u8) {
    if sk.is_null() {
        return;
    }
    let o = offsets();
    // SAFETY: a BTF-typed pointer the verifier checks each load against.
    let protocol: Option<u16> = unsafe { Direct(sk).read(o.sk_protocol) };
    if protocol == Some(IPPROTO_TCP) {
        submit_note(ctx, sk as u64, note::ACCEPTED, 0);
    }
}

/// `syscalls:sys_exit_accept4` and `syscalls:sys_exit_accept`: the application took a
/// connection from a listener's accept queue, and `ret` is its new descriptor. The program
/// follows the descriptor to the socket (current task → `files` → `fdt` → `fd[ret]` → the
/// file's `struct socket` → `sk`) and notes the socket's address, the key the tracker
/// knows it by. The descriptor was installed by this very call (`do_accept()` →
/// `fd_install()`); a sibling thread could close or replace it before the exit runs, so the
/// file must still be the socket's own (`socket->file`) and a TCP socket. A classic
/// tracepoint (syscall events have no BTF build), one event per accept. The fallback where
/// BPF trampolines are refused: enabling any syscall tracepoint sends every system call of
/// every task through the kernel's slow path (`TIF_SYSCALL_TRACEPOINT`), so the daemon takes
/// this route only when asked. Accepts that go through io_uring do not exit these syscalls
/// and are not seen.
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    // SAFETY: the loader verified the offset against the event's `format` file.
    let fd: i64 = unsafe { field(&ctx, syscall_exit::RET) };
    if fd < 0 {
        return 0;
    }
    let o = offsets();
    // SAFETY: every read goes through bpf_probe_read_kernel, which fails safely; an unknown
    // offset or a NULL pointer along the way ends the walk.
    unsafe {
        let task = Probe(generated::bpf_get_current_task());
        let table = task.follow(o.task_files).follow(o.files_fdt);
        match table.read::<u32>(o.fdt_max_fds) {
            Some(max_fds) if (fd as u64) < u64::from(max_fds) => {}
            _ => return 0,
        }
        let slots = table.follow(o.fdt_fd);
        let file = Probe(slots.0).follow_at(fd as u64 * 8);
        let socket = file.follow(o.file_private_data);
        if file.0 == 0 || socket.read::<u64>(o.socket_file) != Some(file.0) {
            return 0;
        }
        let sk = socket.follow(o.socket_sk);
        let family: Option<u16> = sk.read(o.skc_family);
        let protocol: Option<u16> = sk.read(o.sk_protocol);
        if !matches!(family, Some(AF_INET | AF_INET6)) || protocol != Some(IPPROTO_TCP) {
            return 0;
        }
        submit_note(&ctx, sk.0, note::ACCEPTED, 0);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// bpf_probe_read_kernel is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
