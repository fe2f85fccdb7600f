//! A TCP proxy that can cut its traffic: a network partition of one client (one host's agent
//! from etcd) without touching the machine's network, for machines that allow no network
//! namespaces ([`crate::netns`]). While cut, open connections are dropped and new ones are
//! closed at once, as a peer behind a broken link looks to a client whose keep-alive
//! notices. It also forwards from a namespace's link to a server on loopback.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One proxy in front of `upstream`, on a free port.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream`.
    ///
    /// # Errors
    /// If no port can be bound.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        Proxy::start_on(std::net::Ipv4Addr::LOCALHOST.into(), upstream).await
    }

    /// Starts forwarding to `upstream` from a free port of `bind`.
    ///
    /// # Errors
    /// If no port can be bound.
    pub async fn start_on(bind: std::net::IpAddr, upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind((bind, 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *cut_rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, cut, task })
    }

    /// Cuts (`true`) or restores (`false`) the link.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// `http://ADDR`, for an endpoint list.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
