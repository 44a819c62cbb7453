//! A TCP proxy on a fixed loopback port, to take a database server "down" and back up under a
//! running agent: `stop` closes the listener and cuts every open connection; `start` listens
//! on the same port again.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

pub struct Proxy {
    port: u16,
    target: SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Proxy {
    /// A proxy to `target` on a free loopback port (not started).
    pub fn new(target: SocketAddr) -> Self {
        let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
        Self {
            port,
            target,
            running: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Listens on the port and forwards every connection to the target. Returns once the
    /// listener is bound.
    pub fn start(&mut self) {
        assert!(self.running.is_none(), "proxy already running");
        let (port, target) = (self.port, self.target);
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = bound_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(serve(port, target, bound_tx, stop_rx));
            // Dropping the runtime drops every remaining task and its sockets.
        });
        match bound_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => self.running = Some((stop_tx, thread)),
            Ok(Err(e)) => panic!("proxy on port {port}: {e}"),
            Err(e) => panic!("proxy on port {port} did not start: {e}"),
        }
    }

    /// Closes the listener and every open connection; returns when they are closed.
    pub fn stop(&mut self) {
        let (stop, thread) = self.running.take().expect("proxy is not running");
        let _ = stop.send(());
        thread.join().expect("proxy thread");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

async fn serve(
    port: u16,
    target: SocketAddr,
    bound: std::sync::mpsc::Sender<Result<(), String>>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            let _ = bound.send(Err(format!("bind: {e}")));
            return;
        }
    };
    let _ = bound.send(Ok(()));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else { continue };
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}
