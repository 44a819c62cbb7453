//! A fault proxy between every pair of agents: each directed link (node `i` dialling node
//! `j`) goes through its own loopback port, and each link can be cut, stalled, delayed or
//! passed at any moment.
//!
//! - [`Fault::Cut`]: every open connection is reset (RST) and new ones are reset at once.
//! - [`Fault::Stall`]: connections stay open but no byte moves (nor are new ones forwarded)
//!   until the fault changes; a stalled connection then resumes where it stopped.
//! - [`Fault::Delay`]: every chunk waits this long before it is forwarded.
//!
//! All links run on one runtime of the proxy's own, so the test thread stays free to drive
//! the agents; every task ends when the [`FaultNet`] is dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Cut,
    Stall,
    Delay(Duration),
}

/// Bytes read from one side before they are forwarded.
const CHUNK: usize = 64 * 1024;

struct Link {
    port: u16,
    fault: watch::Sender<Fault>,
}

/// The proxies of a cluster, keyed by (dialling node, dialled node).
pub struct FaultNet {
    runtime: Option<tokio::runtime::Runtime>,
    links: BTreeMap<(usize, usize), Link>,
    cancel: CancellationToken,
}

impl FaultNet {
    /// A proxy for each ordered pair of `targets` (the nodes' listen addresses), all passing,
    /// on the loopback ports `ports` (`n * (n - 1)` of them, reserved together with the
    /// nodes' own ports so that no proxy can take a node's port).
    pub fn full_mesh(targets: &[SocketAddr], ports: &[u16]) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("fault-proxy")
            .build()
            .expect("fault proxy runtime");
        let cancel = CancellationToken::new();
        let mut links = BTreeMap::new();
        let mut free = ports.iter();
        for (i, _) in targets.iter().enumerate() {
            for (j, target) in targets.iter().enumerate() {
                if i == j {
                    continue;
                }
                let port = *free.next().expect("a port for every link");
                let listener = runtime
                    .block_on(TcpListener::bind(("127.0.0.1", port)))
                    .expect("bind a fault proxy port");
                let port = listener.local_addr().expect("proxy address").port();
                let (fault, rx) = watch::channel(Fault::Pass);
                runtime.spawn(serve(listener, *target, rx, cancel.clone()));
                links.insert((i, j), Link { port, fault });
            }
        }
        Self {
            runtime: Some(runtime),
            links,
            cancel,
        }
    }

    /// The port node `from` dials to reach node `to`.
    pub fn port(&self, from: usize, to: usize) -> u16 {
        self.links[&(from, to)].port
    }

    /// Sets the fault of the link `from` → `to`.
    pub fn set(&self, from: usize, to: usize, fault: Fault) {
        self.links[&(from, to)].fault.send_replace(fault);
    }

    /// Sets the fault of both directions between `a` and `b`.
    pub fn set_pair(&self, a: usize, b: usize, fault: Fault) {
        self.set(a, b, fault);
        self.set(b, a, fault);
    }

    /// Cuts every link between nodes of different groups and passes the others.
    pub fn partition(&self, groups: &[Vec<usize>]) {
        let group_of = |n: usize| groups.iter().position(|g| g.contains(&n));
        for (from, to) in self.links.keys() {
            let fault = if group_of(*from) == group_of(*to) {
                Fault::Pass
            } else {
                Fault::Cut
            };
            self.set(*from, *to, fault);
        }
    }

    /// Every link passes again.
    pub fn heal(&self) {
        for link in self.links.values() {
            link.fault.send_replace(Fault::Pass);
        }
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    fault: watch::Receiver<Fault>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else { continue };
        tokio::spawn(connection(client, target, fault.clone(), cancel.clone()));
    }
}

/// Waits while the link is stalled; the fault it then has.
async fn past_stall(fault: &mut watch::Receiver<Fault>) -> Fault {
    loop {
        let now = *fault.borrow_and_update();
        if now != Fault::Stall {
            return now;
        }
        if fault.changed().await.is_err() {
            return Fault::Cut;
        }
    }
}

/// Closes with a reset rather than a FIN, as a cut network path looks to the peer.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mut fault: watch::Receiver<Fault>,
    cancel: CancellationToken,
) {
    let first = tokio::select! {
        _ = cancel.cancelled() => return reset(client),
        f = past_stall(&mut fault) => f,
    };
    if first == Fault::Cut {
        return reset(client);
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return reset(client);
    };
    // Every close is a reset: a cut must look to both sides like a network path that broke.
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        let _ = s.set_zero_linger();
    }
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, fault.clone());
    let down = pump(sr, cw, fault.clone());
    let cut = async {
        loop {
            if *fault.borrow_and_update() == Fault::Cut {
                return;
            }
            if fault.changed().await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first ends the connection: a side closing, a cut, or the test.
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = cut => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// Copies one direction, honouring stalls and delays, until either side closes or a cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        match past_stall(&mut fault).await {
            Fault::Cut => return,
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Pass | Fault::Stall => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
