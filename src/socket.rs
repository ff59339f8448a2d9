//! The TCP side of a connection: counts it against `--max-connections` (see
//! [`crate::limits`]), caps its kernel send buffer when it is accepted, and keeps a duplicate
//! of its socket so the registry can reset a slow consumer that has stopped reading (its
//! session actor is then stalled and cannot close itself).

use std::any::Any;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use agentcast_actors::router::ResetHandle;
use socket2::SockRef;

use crate::limits::ConnectionCounter;

/// Requested kernel send buffer per connection; Linux doubles it. Without a cap a stalled
/// client pins megabytes of kernel memory that RSS does not show. Much smaller and a fast
/// reader on loopback (64 KiB segments) waits out the peer's delayed ACK after every segment.
pub const SEND_BUFFER_BYTES: usize = 128 * 1024;

/// A duplicate handle on a connection's socket, kept in the connection's extensions.
#[derive(Clone)]
pub struct ConnSocket(Arc<OwnedFd>);

impl ConnSocket {
    /// Resets the connection: SO_LINGER 0, then shutdown. The server's own handle then fails,
    /// actix drops the connection, and the close sends a RST instead of waiting on the peer.
    pub fn reset_handle(&self) -> ResetHandle {
        let fd = self.0.clone();
        Arc::new(move || {
            let sock = SockRef::from(&*fd);
            if let Err(e) = sock.set_linger(Some(Duration::ZERO)) {
                log::debug!("SO_LINGER on a slow consumer failed: {e}");
            }
            if let Err(e) = sock.shutdown(std::net::Shutdown::Both) {
                log::debug!("shutdown of a slow consumer failed: {e}");
            }
        })
    }
}

/// The `HttpServer::on_connect` hook: counts the connection with `counter` (the guard lives
/// in the connection's extensions), then prepares its socket ([`on_connect`]).
pub fn on_connect_counted(
    counter: Arc<ConnectionCounter>,
) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static {
    move |conn, ext| {
        ext.insert(counter.admit());
        on_connect(conn, ext);
    }
}

/// Prepares a new connection's socket.
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    let Some(tcp) = conn.downcast_ref::<TcpStream>() else {
        return;
    };
    if let Err(e) = SockRef::from(tcp).set_send_buffer_size(SEND_BUFFER_BYTES) {
        log::warn!("could not cap a connection's send buffer: {e}");
    }
    // Events are small and must leave at once: Nagle would hold each one back waiting for
    // the previous one's ACK (measured: paced p99 32 ms with it, 4-7 ms without).
    if let Err(e) = tcp.set_nodelay(true) {
        log::warn!("could not set TCP_NODELAY on a connection: {e}");
    }
    match tcp.as_fd().try_clone_to_owned() {
        Ok(fd) => {
            ext.insert(ConnSocket(Arc::new(fd)));
        }
        Err(e) => log::warn!("could not keep a handle on a connection's socket: {e}"),
    }
}
