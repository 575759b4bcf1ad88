//! Power loss, emulated at the block device: a node's data directory lives on an ext2
//! filesystem (no journal to hide missing fsyncs) in a loop-mounted image file; right after its
//! writes are acknowledged the image is copied, which keeps exactly what had reached the
//! device, as a power cut would. The copy is checked with e2fsck, mounted, and a node started
//! on it must have every acknowledged write.
//!
//! Needs root, `losetup`, `mkfs.ext2` and `e2fsck`; without them the test says why and passes
//! (as the nemesis does without network namespaces). On this machine's kernel ext2 also wrote
//! directory entries that were never fsynced, so this test cannot tell a missing directory
//! fsync apart; a filesystem that drops them (the issue's "power-loss filesystem") can.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use raftkv::client::Client;

/// A loop-mounted filesystem image; unmounted and detached on drop.
struct Mounted {
    dev: String,
    at: PathBuf,
}

impl Mounted {
    fn attach(img: &Path, at: &Path) -> Result<Mounted, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(img)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let ok = Command::new("mount")
            .arg(&dev)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
            return Err(format!("mount {dev} failed"));
        }
        Ok(Mounted {
            dev,
            at: at.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

async fn wait_leader(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = client
            .status_all(Duration::from_millis(300))
            .await
            .into_iter()
            .any(|r| r.result.is_ok_and(|s| s.role == "leader"));
        if up {
            return;
        }
        assert!(Instant::now() < deadline, "no leader within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut() {
    // /proc/self belongs to the effective user.
    let root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    let tools = ["losetup", "mkfs.ext2", "e2fsck"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    if !root || !tools {
        println!("power-loss test skipped: needs root, losetup, mkfs.ext2 and e2fsck");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(256 << 20))
        .expect("image");
    let ok = Command::new("mkfs.ext2")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mkfs.ext2");
    let mnt = dir.path().join("mnt");
    let mounted = match Mounted::attach(&img, &mnt) {
        Ok(m) => m,
        Err(e) => {
            println!("power-loss test skipped: no loop device ({e})");
            return;
        }
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"nodes": [{{"id": 1, "host": "127.0.0.1", "port": {port}}}], "election_timeout_ms": {{"min": 150, "max": 300}}, "heartbeat_interval_ms": 50, "data_directory": "{}", "log_directory": "{}"}}"#,
            mnt.join("data").display(),
            dir.path().join("logs").display()
        ),
    )
    .expect("config");
    let cfg = raftkv::config::Config::load(&config).expect("load config");
    let mut client = Client::new(cfg.addrs()).with_timeout(Duration::from_secs(10));

    // A fresh data directory, its first writes, and the power cut right after the last ack:
    // everything fjall and raftkv created (directories included) must be on the device.
    let mut n = super::harness::spawn_node(&config, 1);
    wait_leader(&client).await;
    for i in 0..200 {
        client
            .put(format!("k{i}"), format!("v{i}"))
            .await
            .expect("acknowledged write");
    }
    let cut = dir.path().join("after-power-cut.img");
    std::fs::copy(&img, &cut).expect("copy the device");
    let _ = n.kill();
    let _ = n.wait();
    drop(mounted);

    // e2fsck exits 1 when it corrected something, as after any power cut.
    let fsck = Command::new("e2fsck")
        .arg("-fy")
        .arg(&cut)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("e2fsck");
    assert!(fsck.code().is_some_and(|c| c <= 1), "e2fsck: {fsck}");
    let _mounted = Mounted::attach(&cut, &mnt).expect("mount the image after the cut");
    let mut n = super::harness::spawn_node(&config, 1);
    wait_leader(&client).await;
    for i in [0, 1, 100, 198, 199] {
        let v = client.get(format!("k{i}"), false).await.expect("read");
        assert_eq!(
            v.as_deref(),
            Some(format!("v{i}").as_bytes()),
            "acknowledged write k{i} after the power cut"
        );
    }
    let _ = n.kill();
    let _ = n.wait();
}
