//! The real side of the kubelet's `Runtime` seam: every call against a real containerd (its own namespace,
//! directory and cgroup parent) with runc and the reference CNI plugins.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use weft_control::kubelet::cri::{ContainerState, CriRuntime, PodSandboxState, Runtime};
use weft_lab::containerd::{ContainerdFixture, POD_SUBNET};

fn sandbox_config(name: &str, uid: &str, cgroup_parent: &str, log_dir: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.into(),
        labels: HashMap::from([("test".to_string(), uid.to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig { cgroup_parent: cgroup_parent.into(), ..Default::default() }),
        ..Default::default()
    }
}

fn container_config(name: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: "weft.local/busybox:1".into(), ..Default::default() }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}

async fn wait_exited(rt: &CriRuntime, id: &str) -> cri::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = rt.container_status(id).await.expect("status");
        if s.state == ContainerState::ContainerExited as i32 || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn cri_runs_a_sandbox_and_containers_on_real_containerd() {
    let fx = ContainerdFixture::start().expect("containerd");
    let endpoint = fx.endpoint();
    let parent = fx.cgroup_parent();
    let log_dir = fx.dir().join("pods/p1").display().to_string();
    let log = fx.log_path();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let rt = CriRuntime::connect(&endpoint).unwrap();
        let (name, version) = rt.version().await.expect("version");
        assert_eq!(name, "containerd");
        assert!(!version.is_empty());

        assert!(rt.image_status("weft.local/busybox:1").await.unwrap().is_some(), "imported image is present");
        assert!(rt.image_status("weft.local/nothere:1").await.unwrap().is_none());
        let cfg = sandbox_config("p1", "uid-1", &parent, &log_dir);
        let err = rt.pull_image("weft.local/nothere:1", cfg.clone()).await.expect_err("no registry reachable");
        assert!(!err.message().is_empty());

        let sb = match rt.run_pod_sandbox(cfg.clone()).await {
            Ok(id) => id,
            Err(e) => panic!("RunPodSandbox: {e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()),
        };
        let st = rt.pod_sandbox_status(&sb).await.unwrap();
        assert_eq!(st.state, PodSandboxState::SandboxReady as i32);
        let ip: std::net::Ipv4Addr = st.network.as_ref().unwrap().ip.parse().expect("sandbox has an IPv4 address");
        let net: ipnetwork::Ipv4Network = POD_SUBNET.parse().unwrap();
        assert!(net.contains(ip), "{ip} in {POD_SUBNET}");
        // Pods go under our cgroup parent, never the root cgroup.
        assert!(std::path::Path::new("/sys/fs/cgroup/pids").join(parent.trim_start_matches('/')).is_dir());

        let listed = rt
            .list_pod_sandbox(Some(cri::PodSandboxFilter {
                label_selector: HashMap::from([("test".to_string(), "uid-1".to_string())]),
                ..Default::default()
            }))
            .await
            .unwrap();
        assert_eq!(listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec![sb.as_str()]);

        let long =
            rt.create_container(&sb, container_config("sleeper", &["sleep", "1000"]), cfg.clone()).await.unwrap();
        rt.start_container(&long).await.unwrap();
        let s = rt.container_status(&long).await.unwrap();
        assert_eq!(s.state, ContainerState::ContainerRunning as i32);
        let out = rt
            .exec_sync(&long, vec!["sh".into(), "-c".into(), "echo hi; exit 7".into()], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((out.exit_code, String::from_utf8_lossy(&out.stdout).trim()), (7, "hi"));

        let short =
            rt.create_container(&sb, container_config("quitter", &["sh", "-c", "exit 3"]), cfg.clone()).await.unwrap();
        rt.start_container(&short).await.unwrap();
        let s = wait_exited(&rt, &short).await;
        assert_eq!((s.state, s.exit_code), (ContainerState::ContainerExited as i32, 3));

        let all = rt.list_containers(None).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|c| c.pod_sandbox_id == sb));

        rt.stop_container(&long, Duration::from_secs(1)).await.unwrap();
        let s = wait_exited(&rt, &long).await;
        assert_eq!(s.state, ContainerState::ContainerExited as i32);
        for c in [&long, &short] {
            rt.remove_container(c).await.unwrap();
        }
        assert!(rt.container_status(&long).await.unwrap_err().is_not_found());
        rt.stop_pod_sandbox(&sb).await.unwrap();
        rt.remove_pod_sandbox(&sb).await.unwrap();
        assert!(rt.list_pod_sandbox(None).await.unwrap().is_empty());
    });
}
