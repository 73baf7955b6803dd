//! The per-connection live tail: records ([`record`]), what a client asks for ([`filter`]),
//! the daemon side ([`hub`]), human output ([`format`](mod@format)) and the `tcpmon tail` client
//! ([`client`]).

pub mod client;
pub mod filter;
pub mod format;
pub mod hub;
pub mod json;
pub mod record;
