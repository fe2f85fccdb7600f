//! Who changed what: tokens have names and roles, a role that may not write is refused
//! (403, naming the role needed), and every write is recorded with its author and the fields
//! it changed, never their values.

use corral_controller::store::{Author, Store};
use corral_proto::api::{ProgramAction, Role};
use corral_proto::keys::Keys;
use corral_proto::resource::Kind;
use corral_tests::corral::{Controller, OPERATOR_TOKEN, READ_ONLY_TOKEN, TOKEN, binary};
use corral_tests::etcd::Etcd;
use corral_tests::specs::program;

fn forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, corral_cli::client::ClientError>, needs: &str) {
    match r {
        Err(e) => {
            assert_eq!(e.status(), Some(403), "{what}: {e}");
            assert!(e.to_string().contains(&format!("needs role {needs}")), "{what}: {e}");
        }
        Ok(v) => panic!("{what} was allowed: {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_limit_what_a_token_may_do_and_every_write_is_recorded() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let (admin, operator, reader) = (
        controller.api()?,
        controller.api_as(OPERATOR_TOKEN)?,
        controller.api_as(READ_ONLY_TOKEN)?,
    );
    admin
        .apply(&program("web", |s| s.command = "/bin/sleep 100".into()), false)
        .await?;

    // A read-only token reads and dry-runs, and writes nothing.
    assert_eq!(reader.programs().await?.len(), 1);
    reader
        .apply(&program("web", |s| s.command = "/bin/sleep 101".into()), true)
        .await?;
    forbidden(
        "apply as read-only",
        reader
            .apply(&program("web", |s| s.command = "/bin/sleep 101".into()), false)
            .await,
        "admin",
    );
    forbidden(
        "restart as read-only",
        reader.act("web", &ProgramAction::Restart).await,
        "operator",
    );
    forbidden(
        "delete as read-only",
        reader.delete(Kind::Program, "web", false).await,
        "admin",
    );
    // An operator acts on programs, and changes no spec.
    operator.act("web", &ProgramAction::Restart).await?;
    forbidden(
        "apply as operator",
        operator
            .apply(&program("web", |s| s.command = "/bin/sleep 102".into()), false)
            .await,
        "admin",
    );
    assert_eq!(admin.program("web").await?.spec.command, "/bin/sleep 100");

    // An admin's changes, one of them to a secret.
    admin
        .apply(
            &program("web", |s| {
                s.command = "/bin/sleep 103".into();
                s.environment = Some([("DB_PASSWORD".to_string(), "hunter2-secret".to_string())].into());
            }),
            false,
        )
        .await?;
    admin.apply(&program("other", |_| {}), false).await?;
    admin.delete(Kind::Program, "web", false).await?;

    let h = reader.history(None, Some("web"), 50).await?;
    let seen: Vec<(&str, &str, Role, Option<u64>)> = h
        .iter()
        .map(|e| (e.verb.as_str(), e.who.as_str(), e.role, e.generation))
        .collect();
    assert_eq!(
        seen,
        [
            ("delete", "admin", Role::Admin, None),
            ("apply", "admin", Role::Admin, Some(3)),
            ("restart", "operator", Role::Operator, Some(2)),
            ("create", "admin", Role::Admin, Some(1)),
        ],
        "newest first, refused and dry-run writes not recorded"
    );
    assert_eq!(h[1].changes, ["spec.command", "spec.environment.DB_PASSWORD"]);
    assert_eq!(h[2].changes, ["spec.restarted_at"]);
    assert!(h[0].changes.is_empty(), "a delete changes no field: {:?}", h[0].changes);
    assert!(h[3].changes.contains(&"spec.command".to_string()), "{:?}", h[3].changes);
    let json = serde_json::to_string(&h)?;
    assert!(!json.contains("hunter2"), "a value reached the audit: {json}");
    assert!(h.iter().all(|e| e.at.ends_with('Z') && e.at.len() >= 20), "{h:?}");
    // Every program, newest first; a limit keeps the newest.
    let all = admin.history(None, None, 2).await?;
    assert_eq!(
        all.iter()
            .map(|e| (e.verb.as_str(), e.name.as_str()))
            .collect::<Vec<_>>(),
        [("delete", "web"), ("create", "other")]
    );

    // The CLI's view, and its refusal.
    let corral = |token: &str, args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new(binary("corral")?)
            .args(["--server", &controller.url, "--token", token])
            .args(args)
            .output()?)
    };
    let out = corral(READ_ONLY_TOKEN, &["history", "web"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("operator (operator)") && text.contains("restart"),
        "{text}"
    );
    assert!(text.contains("spec.command, spec.environment.DB_PASSWORD"), "{text}");
    let out = corral(READ_ONLY_TOKEN, &["stop", "other"])?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token \"reader\" is read-only"), "{err}");
    // A token the controller does not know reads nothing, history included.
    assert_eq!(corral("nope", &["history"])?.status.code(), Some(1));
    assert!(corral(TOKEN, &["history", "--limit", "1"])?.status.success());
    Ok(())
}

/// The audit is bounded: the oldest entries go first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_keeps_the_newest_entries() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let store = Store::new(
        corral_etcd::Etcd::connect(&corral_etcd::EtcdOptions::plain(&etcd.endpoints())).await?,
        Keys::default(),
    );
    let by = Author {
        name: "alice".into(),
        role: Role::Admin,
    };
    for i in 0..6 {
        let p = corral_tests::specs::program_object("p", |s| s.command = format!("/bin/sleep {}", 100 + i));
        store.apply(p, false, &by).await?;
    }
    store.prune_audit(3).await?;
    let kept: Vec<Option<u64>> = store
        .history(None, None, 100)
        .await?
        .iter()
        .map(|e| e.generation)
        .collect();
    assert_eq!(kept, [Some(6), Some(5), Some(4)]);
    Ok(())
}
