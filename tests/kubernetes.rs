//! The manifests in docs/kubernetes.md are real: each YAML block validates
//! against the Kubernetes schema (`kubernetes-validate --strict`, from PyPI;
//! scripts/install-test-deps.sh installs it), and every Secret, ConfigMap and
//! named port a manifest uses is defined in the same block. Skipped loudly
//! without kubernetes-validate, except in CI.

mod common;

use std::process::Command;

/// The ```yaml blocks of the page.
fn yaml_blocks() -> Vec<String> {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/kubernetes.md"))
        .unwrap();
    page.split("```yaml\n").skip(1).map(|b| b.split("```").next().unwrap().to_string()).collect()
}

/// What each block uses but does not define (PyYAML, which
/// kubernetes-validate brings along).
const REFERENCES: &str = r#"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
problems = []
for d in docs:
    spec = d.get("spec", {}).get("template", {}).get("spec")
    if not spec:
        continue
    for v in spec.get("volumes", []):
        if "secret" in v and ("Secret", v["secret"]["secretName"]) not in defined:
            problems.append("secret %s is not defined" % v["secret"]["secretName"])
        if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in defined:
            problems.append("configMap %s is not defined" % v["configMap"]["name"])
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        ports = {p.get("name") for p in c.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in ports:
                problems.append("%s of %s uses port %s, which it does not declare" % (probe, c["name"], port))
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        missing = mounts - {v["name"] for v in spec.get("volumes", [])}
        if missing:
            problems.append("%s mounts undefined volumes %s" % (c["name"], sorted(missing)))
    labels = d["spec"]["template"]["metadata"].get("labels", {})
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < 35:
        problems.append("%s: terminationGracePeriodSeconds %s < preStop + drain" % (d["metadata"]["name"], grace))
for d in docs:
    if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None":
        selector = d["spec"]["selector"]
        if not any(dep["kind"] == "Deployment" and all(
                dep["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
                for dep in docs):
            problems.append("service %s selects no pod defined here" % d["metadata"]["name"])
print("\n".join(problems))
sys.exit(1 if problems else 0)
"#;

#[test]
fn the_kubernetes_manifests_validate_and_reference_what_they_define() {
    if Command::new("kubernetes-validate").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "kubernetes-validate missing in CI");
        eprintln!("SKIPPED: kubernetes-validate not installed (scripts/install-test-deps.sh)");
        return;
    }
    let blocks = yaml_blocks();
    assert!(blocks.len() >= 2, "the Deployment and the sidecar manifests");
    let tmp = common::tempdir("k8s");
    let dir = tmp.path();
    for (i, block) in blocks.iter().enumerate() {
        let path = dir.join(format!("block{i}.yaml"));
        std::fs::write(&path, block).unwrap();
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(&path)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "block {i} is not valid Kubernetes: {said}\n{block}");
        let out = Command::new("python3").arg("-c").arg(REFERENCES).arg(&path).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "block {i}: {said}{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The Dockerfile builds what the manifests expect: a release build from
/// the locked dependencies, a last stage that runs tcplb as its entrypoint
/// as the numeric user the manifests' `runAsUser` names, and a build context
/// without `target/` or `.git/`. (Building it needs a Docker engine and a
/// registry, which the test machines lack; this reads it.)
#[test]
fn the_dockerfile_builds_the_image_the_manifests_run() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    let (build, run) = (stages[0], stages[stages.len() - 1]);
    assert!(build.contains("cargo build --release --locked"), "{build}");
    let user = run.lines().find_map(|l| l.strip_prefix("USER ")).expect("the last stage sets USER");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("a numeric user");
    assert_ne!(uid, 0, "not root");
    let page = yaml_blocks().join("\n");
    assert!(page.contains(&format!("runAsUser: {uid}")), "the manifests run as {uid}");
    let entry = run.lines().find_map(|l| l.strip_prefix("ENTRYPOINT ")).expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).expect("exec form, so tcplb is PID 1");
    let copied = run.lines().find(|l| l.starts_with("COPY --from=")).expect("the binary is copied");
    assert!(copied.ends_with(&format!(" {}", entry[0])), "{copied} / {entry:?}");
    let ignore = std::fs::read_to_string(format!("{root}/.dockerignore")).unwrap();
    for dir in ["target/", ".git/"] {
        assert!(ignore.lines().any(|l| l.trim() == dir), "{dir} stays out of the build context");
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src", "benches"] {
        assert!(!ignore.lines().any(|l| l.trim().trim_end_matches('/') == needed), "{needed}");
    }
}
