//! Byte pipes to a board: a TCP socket (QEMU's `-serial tcp::PORT,server`, a serial-to-network
//! bridge) or a serial port (`/dev/ttyACM0`, `COM3`) at 8N1.
//!
//! Every read has a timeout ([`Port::set_read_timeout`]) and every write has one too, so nothing
//! here can block forever.

use super::LinkError;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The baud rate when none is given: what Kiln firmware uses.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Pause between two connection attempts.
const CONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Where a board is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp:HOST:PORT`.
    Tcp {
        /// Host name or address (an IPv6 address in brackets: `tcp:[::1]:4444`).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A serial device, 8 data bits, no parity, one stop bit, no flow control.
    Serial {
        /// Device path (`/dev/ttyUSB0`, `COM3`).
        path: String,
        /// Baud rate.
        baud: u32,
    },
}

impl Endpoint {
    /// Parses `tcp:HOST:PORT` or a serial device path; `baud` applies to serial ports.
    ///
    /// # Errors
    /// [`LinkError::BadEndpoint`] for anything else.
    pub fn parse(text: &str, baud: u32) -> Result<Endpoint, LinkError> {
        let bad = |why: &str| LinkError::BadEndpoint {
            given: text.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = text.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("it has no port"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || port == 0 {
                return Err(bad("it needs a host and a port from 1 to 65535"));
            }
            return Ok(Endpoint::Tcp {
                host: host.to_string(),
                port,
            });
        }
        let looks_like_port = text.starts_with('/')
            || text.starts_with("\\\\.\\")
            || text
                .strip_prefix("COM")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !looks_like_port {
            return Err(bad("it is neither tcp:HOST:PORT nor a device path"));
        }
        if baud == 0 {
            return Err(bad("the baud rate must be above 0"));
        }
        Ok(Endpoint::Serial {
            path: text.to_string(),
            baud,
        })
    }

    /// Opens the pipe, retrying until `wait` has passed (a board or QEMU that is still starting,
    /// a USB serial port that is re-enumerating after a reset). Writes time out after
    /// `write_timeout`.
    ///
    /// # Errors
    /// [`LinkError::Connect`] when no attempt succeeded in time, [`LinkError::BadEndpoint`] when
    /// the host name does not resolve.
    pub fn open(
        &self,
        wait: Duration,
        write_timeout: Duration,
    ) -> Result<Box<dyn Port>, LinkError> {
        let deadline = Instant::now() + wait;
        loop {
            let attempt = match self {
                Endpoint::Tcp { host, port } => {
                    self.connect_tcp(host, *port, deadline, write_timeout)
                }
                Endpoint::Serial { path, baud } => open_serial(path, *baud, write_timeout),
            };
            match attempt {
                Ok(port) => return Ok(port),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(reason)) => {
                    if Instant::now() + CONNECT_PAUSE >= deadline {
                        return Err(LinkError::Connect {
                            endpoint: self.to_string(),
                            waited: wait,
                            reason,
                        });
                    }
                    std::thread::sleep(CONNECT_PAUSE);
                }
            }
        }
    }

    fn connect_tcp(
        &self,
        host: &str,
        port: u16,
        deadline: Instant,
        write_timeout: Duration,
    ) -> Result<Box<dyn Port>, Attempt> {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| {
                Attempt::Fatal(LinkError::BadEndpoint {
                    given: self.to_string(),
                    why: format!("the host does not resolve ({e})"),
                })
            })?
            .collect();
        let mut reason = String::from("the host has no address");
        for addr in addrs {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            match TcpStream::connect_timeout(&addr, left) {
                Ok(stream) => {
                    let setup = stream
                        .set_nodelay(true)
                        .and_then(|()| stream.set_write_timeout(Some(at_least_1ms(write_timeout))));
                    return match setup {
                        Ok(()) => Ok(Box::new(stream)),
                        Err(e) => Err(Attempt::Retry(e.to_string())),
                    };
                }
                Err(e) => reason = e.to_string(),
            }
        }
        Err(Attempt::Retry(reason))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Endpoint::Serial { path, .. } => f.write_str(path),
        }
    }
}

/// One failed attempt to open: worth retrying, or not.
enum Attempt {
    Retry(String),
    Fatal(LinkError),
}

fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// A bidirectional byte pipe with a settable read timeout.
pub trait Port: Read + Write + Send {
    /// Makes the next reads return `TimedOut` / `WouldBlock` after `timeout` without data.
    ///
    /// # Errors
    /// The OS refused the setting.
    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()>;
}

impl Port for TcpStream {
    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        TcpStream::set_read_timeout(self, Some(at_least_1ms(timeout)))
    }
}

/// A serial port (its one timeout governs reads and writes).
struct SerialPort {
    port: Box<dyn serialport::SerialPort>,
    write_timeout: Duration,
}

impl Read for SerialPort {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.port.read(buf)
    }
}

impl Write for SerialPort {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.port
            .set_timeout(self.write_timeout)
            .map_err(io::Error::from)?;
        self.port.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.port.flush()
    }
}

impl Port for SerialPort {
    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.port
            .set_timeout(at_least_1ms(timeout))
            .map_err(io::Error::from)
    }
}

fn open_serial(path: &str, baud: u32, write_timeout: Duration) -> Result<Box<dyn Port>, Attempt> {
    use serialport::{ClearBuffer, DataBits, FlowControl, Parity, StopBits};
    let port = serialport::new(path, baud)
        .data_bits(DataBits::Eight)
        .parity(Parity::None)
        .stop_bits(StopBits::One)
        .flow_control(FlowControl::None)
        .timeout(Duration::from_millis(100))
        .open()
        .map_err(|e| Attempt::Retry(e.description))?;
    // Bytes that queued up before we opened (boot messages) are not answers to us.
    let _ = port.clear(ClearBuffer::Input);
    Ok(Box::new(SerialPort {
        port,
        write_timeout: at_least_1ms(write_timeout),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_serial_endpoints() {
        let tcp = Endpoint::parse("tcp:127.0.0.1:4444", DEFAULT_BAUD).unwrap();
        assert_eq!(
            tcp,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(tcp.to_string(), "tcp:127.0.0.1:4444");
        let v6 = Endpoint::parse("tcp:[::1]:9", DEFAULT_BAUD).unwrap();
        assert_eq!(v6.to_string(), "tcp:[::1]:9");
        let tty = Endpoint::parse("/dev/ttyACM0", 921_600).unwrap();
        assert_eq!(
            tty,
            Endpoint::Serial {
                path: "/dev/ttyACM0".into(),
                baud: 921_600
            }
        );
        assert!(Endpoint::parse("COM3", DEFAULT_BAUD).is_ok());
        for bad in [
            "tcp:host", "tcp::80", "tcp:h:0", "tcp:h:x", "ttyUSB0", "COM", "/dev/x",
        ] {
            let baud = if bad == "/dev/x" { 0 } else { DEFAULT_BAUD };
            let e = Endpoint::parse(bad, baud).unwrap_err().to_string();
            assert!(e.contains(bad) && !e.contains('\n'), "{e}");
        }
    }
}
