//! `weft-cni`, a CNI 1.0 plugin that behaves like flannel's: it reads the node's `subnet.env`, turns it
//! into a config for a delegate plugin (the reference `bridge` + `host-local`) and runs that delegate.
//! It touches only its data dir (saved delegate configs) and whatever the delegate it runs touches.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

pub use crate::subnet_env::SubnetEnv;

/// The CNI spec version of our own results and errors.
pub const CNI_VERSION: &str = "1.0.0";
/// Versions whose configs we accept (the delegate gets the config's version unchanged).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// Everything that can go wrong, each with the well-known CNI error code it reports.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("incompatible CNI version {0:?}")]
    IncompatibleVersion(String),
    #[error("{0}")]
    InvalidEnv(String),
    #[error("failed to decode network config: {0}")]
    Decoding(String),
    #[error("invalid network config: {0}")]
    InvalidConfig(String),
    /// The agent has not written the node's subnet yet: the runtime should retry.
    #[error("failed to read subnet file {path}: {source} (is weft agent running on this node?)")]
    SubnetFileMissing { path: PathBuf, source: std::io::Error },
    #[error("invalid subnet file {path}: {problem}")]
    SubnetFileInvalid { path: PathBuf, problem: String },
    #[error("failed to find plugin {name:?} in path {path:?}")]
    DelegateNotFound { name: String, path: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("delegate {name} failed: {problem}")]
    Delegate { name: String, problem: String },
}

impl CniError {
    /// The CNI spec's error codes: 1 version, 4 env, 6 decoding, 7 config, 11 try later, 999 other.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion(_) => 1,
            CniError::InvalidEnv(_) => 4,
            CniError::Decoding(_) => 6,
            CniError::InvalidConfig(_) => 7,
            CniError::SubnetFileMissing { .. } => 11,
            _ => 999,
        }
    }

    /// The error object the spec wants on stdout.
    pub fn to_json(&self) -> Value {
        let details = match self {
            CniError::SubnetFileMissing { path, .. } | CniError::SubnetFileInvalid { path, .. } => {
                format!("subnet file {}", path.display())
            }
            CniError::DelegateNotFound { path, .. } => format!("CNI_PATH={path}"),
            _ => String::new(),
        };
        let mut v = json!({"cniVersion": CNI_VERSION, "code": self.code(), "msg": self.to_string()});
        if !details.is_empty() {
            v["details"] = Value::String(details);
        }
        v
    }
}

/// Reads the agent's subnet file; a missing file is "try again later" for the runtime.
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CniError::SubnetFileMissing { path: path.to_path_buf(), source })?;
    SubnetEnv::parse(&text)
        .map_err(|e| CniError::SubnetFileInvalid { path: path.to_path_buf(), problem: e.to_string() })
}

/// The network config on stdin, as far as we read it; the whole object is kept for the delegate.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub delegate: Map<String, Value>,
    pub raw: Map<String, Value>,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| CniError::Decoding(e.to_string()))?;
        let Value::Object(raw) = v else {
            return Err(CniError::Decoding("network config is not a JSON object".into()));
        };
        let string = |key: &str, default: Option<&str>| -> Result<String> {
            match raw.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                None | Some(Value::Null) => {
                    default.map(str::to_string).ok_or_else(|| CniError::InvalidConfig(format!("{key:?} is missing")))
                }
                Some(other) => Err(CniError::InvalidConfig(format!("{key:?} must be a string, not {other}"))),
            }
        };
        let cni_version = string("cniVersion", Some("0.3.1"))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion(cni_version));
        }
        let delegate = match raw.get("delegate") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => return Err(CniError::InvalidConfig(format!("\"delegate\" must be an object, not {other}"))),
        };
        Ok(NetConf {
            name: string("name", None)?,
            subnet_file: string("subnetFile", Some(DEFAULT_SUBNET_FILE))?.into(),
            data_dir: string("dataDir", Some(DEFAULT_DATA_DIR))?.into(),
            cni_version,
            delegate,
            raw,
        })
    }
}

/// The delegate's network config: flannel's defaults for `bridge`, then the user's `delegate` keys on top.
pub fn delegate_config(conf: &NetConf, env: &SubnetEnv) -> Value {
    let mut d = Map::new();
    let kind = conf.delegate.get("type").and_then(Value::as_str).unwrap_or("bridge").to_string();
    d.insert("type".into(), json!(kind));
    if kind == "bridge" {
        d.insert("bridge".into(), json!("cni0"));
        d.insert("isGateway".into(), json!(true));
        d.insert("hairpinMode".into(), json!(true));
    }
    d.insert("mtu".into(), json!(env.mtu));
    d.insert("ipMasq".into(), json!(!env.ipmasq));
    for (k, v) in &conf.delegate {
        if k != "ipam" {
            d.insert(k.clone(), v.clone());
        }
    }
    // The runtime's own fields always come from the outer config.
    d.insert("name".into(), json!(conf.name));
    d.insert("cniVersion".into(), json!(conf.cni_version));
    if let Some(rc) = conf.raw.get("runtimeConfig") {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    let mut ipam = json!({
        "type": "host-local",
        "ranges": [[{"subnet": env.subnet.to_string()}]],
        "routes": [{"dst": env.network.to_string()}],
        // Per data dir, so several nodes on one machine (the lab) never share host-local's state.
        "dataDir": conf.data_dir.join("ipam").to_string_lossy(),
    });
    if let (Some(Value::Object(user)), Value::Object(gen)) = (conf.delegate.get("ipam"), &mut ipam) {
        for (k, v) in user {
            gen.insert(k.clone(), v.clone());
        }
    }
    d.insert("ipam".into(), ipam);
    Value::Object(d)
}

/// The CNI environment variables we use.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub path: String,
}

impl CniEnv {
    pub fn from_env() -> Result<CniEnv> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let command = var("CNI_COMMAND").ok_or_else(|| CniError::InvalidEnv("CNI_COMMAND is not set".into()))?;
        let mut env = CniEnv { command, container_id: String::new(), path: var("CNI_PATH").unwrap_or_default() };
        if env.command == "VERSION" {
            return Ok(env);
        }
        if !matches!(env.command.as_str(), "ADD" | "DEL" | "CHECK") {
            return Err(CniError::InvalidEnv(format!("unknown CNI_COMMAND {:?}", env.command)));
        }
        env.container_id =
            var("CNI_CONTAINERID").ok_or_else(|| CniError::InvalidEnv("CNI_CONTAINERID is not set".into()))?;
        // The id names a file in the data dir: refuse anything that could escape it.
        if env.container_id.contains('/') || env.container_id.starts_with('.') {
            return Err(CniError::InvalidEnv(format!("CNI_CONTAINERID {:?} is not a valid id", env.container_id)));
        }
        if env.command != "DEL" {
            for k in ["CNI_NETNS", "CNI_IFNAME"] {
                if var(k).is_none() {
                    return Err(CniError::InvalidEnv(format!("{k} is not set")));
                }
            }
        }
        Ok(env)
    }
}

/// `{"cniVersion":"1.0.0","supportedVersions":[…]}`
pub fn version_result() -> Value {
    json!({"cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
}

/// The plugin binary `name` in the colon-separated `cni_path`.
pub fn find_plugin(name: &str, cni_path: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') {
        return Err(CniError::InvalidConfig(format!("delegate type {name:?} is not a plugin name")));
    }
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| CniError::DelegateNotFound { name: name.to_string(), path: cni_path.to_string() })
}

/// What a run produced: bytes for stdout and the exit code.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub code: i32,
}

impl Outcome {
    fn ok(stdout: Vec<u8>) -> Outcome {
        Outcome { stdout, code: 0 }
    }
}

/// Runs the delegate with our environment (CNI_COMMAND & co pass through) and `config` on stdin.
fn exec_delegate(env: &CniEnv, config: &Value) -> Result<Outcome> {
    let kind = config.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let bin = find_plugin(&kind, &env.path)?;
    let delegate_err = |problem: String| CniError::Delegate { name: kind.clone(), problem };
    let mut child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| delegate_err(format!("spawning {}: {e}", bin.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(config.to_string().as_bytes()).map_err(|e| delegate_err(format!("writing its stdin: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| delegate_err(format!("waiting for it: {e}")))?;
    match out.status.code() {
        Some(code) => Ok(Outcome { stdout: out.stdout, code }),
        None => Err(delegate_err(format!("killed ({})", out.status))),
    }
}

fn saved_path(conf: &NetConf, env: &CniEnv) -> PathBuf {
    conf.data_dir.join(&env.container_id)
}

/// ADD: build the delegate config from the subnet file, keep it for DEL and CHECK, run the delegate.
fn cmd_add(env: &CniEnv, conf: &NetConf) -> Result<Outcome> {
    let subnet = load_subnet_env(&conf.subnet_file)?;
    let delegate = delegate_config(conf, &subnet);
    let path = saved_path(conf, env);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CniError::Io { what, path, source }
    };
    std::fs::create_dir_all(&conf.data_dir).map_err(io("creating data dir", &conf.data_dir))?;
    // Written whole then renamed, so DEL never reads half a file after a crash.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, delegate.to_string()).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming to", &path))?;
    exec_delegate(env, &delegate)
}

fn load_saved(conf: &NetConf, env: &CniEnv) -> Result<Option<Value>> {
    let path = saved_path(conf, env);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CniError::Decoding(format!("saved delegate config {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CniError::Io { what: "reading", path, source }),
    }
}

/// DEL: the saved delegate config, so the same IPAM state is released even if subnet.env changed.
fn cmd_del(env: &CniEnv, conf: &NetConf) -> Result<Outcome> {
    let Some(delegate) = load_saved(conf, env)? else {
        // Nothing was added (or DEL already ran): DEL must be idempotent.
        return Ok(Outcome::ok(Vec::new()));
    };
    let out = exec_delegate(env, &delegate)?;
    if out.code == 0 {
        let path = saved_path(conf, env);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CniError::Io { what: "removing", path, source }),
        }
    }
    Ok(out)
}

/// CHECK: the saved delegate config, with the runtime's `prevResult`.
fn cmd_check(env: &CniEnv, conf: &NetConf) -> Result<Outcome> {
    let Some(mut delegate) = load_saved(conf, env)? else {
        return Err(CniError::InvalidConfig(format!("no saved delegate config for container {}", env.container_id)));
    };
    if let (Some(prev), Value::Object(d)) = (conf.raw.get("prevResult"), &mut delegate) {
        d.insert("prevResult".into(), with_route_gateways(prev.clone()));
    }
    exec_delegate(env, &delegate)
}

/// host-local's routes carry no `gw`, and `bridge` installs them via the address's gateway on ADD but
/// compares them gateway-less on CHECK (and fails); so CHECK states the gateway ADD really used.
fn with_route_gateways(mut prev: Value) -> Value {
    let gw = prev.pointer("/ips/0/gateway").cloned();
    if let (Some(gw), Some(Value::Array(routes))) = (gw, prev.get_mut("routes")) {
        for r in routes.iter_mut().filter_map(Value::as_object_mut) {
            r.entry("gw").or_insert_with(|| gw.clone());
        }
    }
    prev
}

/// One plugin invocation with its environment and stdin; never panics on outside data.
pub fn run(env: Result<CniEnv>, stdin: &[u8]) -> Outcome {
    let result = env.and_then(|env| {
        if env.command == "VERSION" {
            return Ok(Outcome::ok(version_result().to_string().into_bytes()));
        }
        let conf = NetConf::parse(stdin)?;
        match env.command.as_str() {
            "ADD" => cmd_add(&env, &conf),
            "DEL" => cmd_del(&env, &conf),
            _ => cmd_check(&env, &conf),
        }
    });
    match result {
        Ok(out) => out,
        Err(e) => Outcome { stdout: e.to_json().to_string().into_bytes(), code: 1 },
    }
}

/// The `weft-cni` entry point: CNI env + stdin in, result or error JSON on stdout, the exit code back.
pub fn main() -> i32 {
    let env = CniEnv::from_env();
    let mut stdin = Vec::new();
    if env.as_ref().map(|e| e.command != "VERSION").unwrap_or(false) {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = CniError::Decoding(format!("reading stdin: {e}"));
            println!("{}", err.to_json());
            return 1;
        }
    }
    let out = run(env, &stdin);
    let mut so = std::io::stdout();
    let _ = so.write_all(&out.stdout);
    let _ = so.flush();
    out.code
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn env() -> SubnetEnv {
        SubnetEnv::parse(ENV).unwrap()
    }

    #[test]
    fn default_delegate_is_flannels_bridge_config() {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","dataDir":"/d"}"#).unwrap();
        assert_eq!(conf.subnet_file, Path::new(DEFAULT_SUBNET_FILE));
        let golden = json!({
            "cniVersion": "1.0.0", "name": "weft", "type": "bridge", "bridge": "cni0", "mtu": 1450,
            "isGateway": true, "ipMasq": false, "hairpinMode": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                     "routes": [{"dst": "10.244.0.0/16"}], "dataDir": "/d/ipam"}
        });
        assert_eq!(delegate_config(&conf, &env()), golden);
    }

    #[test]
    fn delegate_keys_override_defaults_and_merge_into_ipam() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"weft-cni","runtimeConfig":{"portMappings":[]},
                 "delegate":{"bridge":"br9","ipMasq":true,"name":"ignored","ipam":{"dataDir":"/mine"}}}"#,
        )
        .unwrap();
        let d = delegate_config(&conf, &SubnetEnv { ipmasq: false, mtu: 1500, ..env() });
        assert_eq!(d["bridge"], "br9");
        assert_eq!(d["ipMasq"], true);
        assert_eq!(d["mtu"], 1500);
        assert_eq!(d["name"], "n");
        assert_eq!(d["cniVersion"], "0.4.0");
        assert_eq!(d["runtimeConfig"], json!({"portMappings": []}));
        assert_eq!(d["ipam"]["dataDir"], "/mine");
        assert_eq!(d["ipam"]["type"], "host-local");

        let ptp = NetConf::parse(br#"{"name":"n","delegate":{"type":"ptp"}}"#).unwrap();
        let d = delegate_config(&ptp, &env());
        assert_eq!(d["type"], "ptp");
        assert!(d.get("bridge").is_none() && d.get("isGateway").is_none());
        assert_eq!(d["ipam"]["dataDir"], "/var/lib/cni/flannel/ipam");
    }

    #[test]
    fn bad_configs_get_the_right_codes() {
        for (json, code, says) in [
            (&b"{not json"[..], 6, "decode"),
            (b"[1]", 6, "not a JSON object"),
            (b"{\"cniVersion\":\"1.0.0\"}", 7, "\"name\" is missing"),
            (b"{\"name\":\"n\",\"delegate\":3}", 7, "delegate"),
            (b"{\"name\":\"n\",\"cniVersion\":\"9.9.9\"}", 1, "9.9.9"),
        ] {
            let e = NetConf::parse(json).unwrap_err();
            assert_eq!(e.code(), code, "{e}");
            assert!(e.to_string().contains(says), "{e} should say {says}");
        }
    }

    #[test]
    fn errors_render_as_cni_error_json() {
        let out = run(Err(CniError::InvalidEnv("CNI_COMMAND is not set".into())), b"");
        assert_eq!(out.code, 1);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v, json!({"cniVersion": "1.0.0", "code": 4, "msg": "CNI_COMMAND is not set"}));

        let env = CniEnv { command: "ADD".into(), container_id: "c1".into(), path: "/nonexistent".into() };
        let out = run(Ok(env), br#"{"cniVersion":"1.0.0","name":"n","subnetFile":"/nonexistent/subnet.env"}"#);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["code"], 11);
        assert!(v["msg"].as_str().unwrap().contains("/nonexistent/subnet.env"), "{v}");
    }

    #[test]
    fn check_states_the_gateway_add_used() {
        let prev = json!({"ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
                          "routes": [{"dst": "10.244.0.0/16"}, {"dst": "10.9.0.0/16", "gw": "10.244.1.9"}]});
        let fixed = with_route_gateways(prev);
        assert_eq!(
            fixed["routes"],
            json!([{"dst": "10.244.0.0/16", "gw": "10.244.1.1"},
                                          {"dst": "10.9.0.0/16", "gw": "10.244.1.9"}])
        );
    }

    #[test]
    fn version_and_missing_plugin() {
        let env = CniEnv { command: "VERSION".into(), ..Default::default() };
        let v: Value = serde_json::from_slice(&run(Ok(env), b"").stdout).unwrap();
        assert_eq!(v, json!({"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}));
        let e = find_plugin("bridge", "/nonexistent:/also-not").unwrap_err();
        assert_eq!(e.code(), 999);
        assert!(e.to_string().contains("bridge"));
        assert_eq!(find_plugin("../x", "/usr/lib/cni").unwrap_err().code(), 7);
    }
}
