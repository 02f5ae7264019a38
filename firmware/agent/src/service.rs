//! The local inference service: a Unix socket, one request at a time per connection.
//!
//! ```text
//! request:  u32 LE length, then that many input bytes (every input, raw, concatenated)
//! answer:   u8 status (0 = ok, 1 = error), u32 LE length, then the output bytes (or a one-line
//!           error message)
//! ```

use crate::agent::Shared;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Largest request accepted.
pub const MAX_REQUEST: u32 = 64 << 20;
/// Longest wait for the rest of a request once its length arrived.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `path` (replacing a stale socket file) and serves until the task is dropped.
///
/// # Errors
/// The socket cannot be bound.
pub async fn serve(path: &Path, shared: Arc<Shared>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = connection(stream, shared).await;
        });
    }
}

async fn connection(mut s: UnixStream, shared: Arc<Shared>) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        // An idle connection may wait for its next request as long as it likes.
        if s.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_REQUEST {
            return answer(
                &mut s,
                1,
                format!("request of {len} bytes is too large").as_bytes(),
            )
            .await;
        }
        let mut input = vec![0u8; len as usize];
        tokio::time::timeout(READ_TIMEOUT, s.read_exact(&mut input))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request stalled"))??;
        let sh = shared.clone();
        let r = tokio::task::spawn_blocking(move || sh.infer(&input))
            .await
            .map_err(std::io::Error::other)?;
        match r {
            Ok(out) => answer(&mut s, 0, &out).await?,
            Err(e) => answer(&mut s, 1, e.to_string().as_bytes()).await?,
        }
    }
}

async fn answer(s: &mut UnixStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = status;
    head[1..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    s.write_all(&head).await?;
    s.write_all(body).await?;
    s.flush().await
}

/// A client call (tests, tools): sends `input`, returns the outputs or the error line.
///
/// # Errors
/// I/O, or the service's error message as `Err(Ok(line))`.
pub async fn call(path: &Path, input: &[u8]) -> std::io::Result<Result<Vec<u8>, String>> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(&(input.len() as u32).to_le_bytes()).await?;
    s.write_all(input).await?;
    let mut head = [0u8; 5];
    tokio::time::timeout(READ_TIMEOUT, s.read_exact(&mut head))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let n = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if n > MAX_REQUEST {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "answer too large",
        ));
    }
    let mut body = vec![0u8; n as usize];
    tokio::time::timeout(READ_TIMEOUT, s.read_exact(&mut body))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(if head[0] == 0 {
        Ok(body)
    } else {
        Err(String::from_utf8_lossy(&body).into_owned())
    })
}
