//! An observation port's accepted connections, counted.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Accepted connections, at most `limit` open at once: one beyond is
/// closed as soon as it is accepted (its peer reads end of stream).
pub(super) fn counted(
    listener: TcpListener,
    limit: usize,
) -> impl Stream<Item = io::Result<Counted>> {
    let slots = Arc::new(Semaphore::new(limit));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        loop {
            let accepted = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => return Some((Err(error), (listener, slots))),
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            // Probes and scrapes are small request/response exchanges.
            let _ = accepted.set_nodelay(true);
            let counted = Counted {
                stream: accepted,
                _slot: slot,
            };
            return Some((Ok(counted), (listener, slots)));
        }
    })
}

/// A connection holding one of its port's slots until it closes.
pub(super) struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
