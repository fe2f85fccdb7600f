//! The test kit's etcd: a real server that later tests build on.

use std::time::Duration;

use corral_tests::etcd::Etcd;
use etcd_client::{EventType, WatchOptions};

#[tokio::test]
async fn etcd_put_and_watch_round_trip() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let put = client.put("/corral/test/a", "1", None).await?;
    let rev = put.header().map(|h| h.revision()).unwrap_or_default();
    let mut stream = client
        .watch(
            "/corral/test/",
            Some(WatchOptions::new().with_prefix().with_start_revision(rev + 1)),
        )
        .await?;
    client.put("/corral/test/b", "2", None).await?;
    client.delete("/corral/test/a", None).await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await??
            .expect("watch open");
        for ev in resp.events() {
            let kv = ev.kv().expect("kv");
            seen.push((ev.event_type(), kv.key_str()?.to_string(), kv.value_str()?.to_string()));
        }
    }
    assert_eq!(
        seen,
        [
            (EventType::Put, "/corral/test/b".to_string(), "2".to_string()),
            (EventType::Delete, "/corral/test/a".to_string(), String::new()),
        ]
    );
    let got = client.get("/corral/test/b", None).await?;
    assert_eq!(got.kvs()[0].value_str()?, "2");
    Ok(())
}
