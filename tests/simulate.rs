//! `egress-scaler simulate` as an operator runs it: the table on the terminal, the files of
//! `--out`, the sweep's answer, CSV traces, and clear errors for bad flags.

use std::process::{Command, Output};

use serde_json::Value;

fn simulate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("run egress-scaler simulate")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("egress-scaler-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn every_policy_gets_a_row_and_the_files_are_written() {
    let dir = temp_dir("simulate-out");
    // A burst of 100 room composites needs 100 pods: lift the shipped ceiling of 40.
    let output = simulate(&[
        "--trace",
        "burst",
        "--max-replicas",
        "100",
        "--out",
        dir.to_str().unwrap(),
        "--sweep",
        "warm-pool=0..1",
        "--p99-under",
        "60",
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    for policy in [
        "egress-scaler",
        "egress-scaler+prewarm",
        "egress-scaler+assist",
        "egress-scaler+prewarm+assist",
        "hpa-cpu",
        "keda-prometheus-available",
        "keda-redis-list",
        "oracle",
    ] {
        assert!(
            text.lines().any(|line| line.starts_with(policy)),
            "{policy} row missing:\n{text}"
        );
    }
    assert!(
        text.contains("cheapest setting with p99 wait under 60 s"),
        "{text}"
    );
    assert!(
        text.contains("ceiling: egress-scaler without one runs up to 100 pods at once"),
        "{text}"
    );
    assert!(text.contains("the ceiling here, 100, is enough"), "{text}");

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("burst.json")).unwrap()).unwrap();
    let policies = json["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 8);
    assert_eq!(json["sweep"].as_array().unwrap().len(), 2);
    assert_eq!(json["requests"], 100);
    assert_eq!(json["ceiling"], 100);
    assert_eq!(json["ceiling_needed"]["pods"], 100);
    let ours = &policies[0];
    assert_eq!(ours["policy"], "egress-scaler");
    assert_eq!(ours["starts"], 100);
    assert_eq!(ours["failed"], 0);

    let csv = std::fs::read_to_string(dir.join("burst.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 8 + 2);
    assert!(csv.starts_with("trace,policy,warm_pool,"));
    let timeline = std::fs::read_to_string(dir.join("burst-timeline.csv")).unwrap();
    assert!(timeline.starts_with("policy,seconds,demand,pods,replicas,waiting\n"));
    assert!(timeline.lines().count() > 8 * 100);
    let svg = std::fs::read_to_string(dir.join("burst.svg")).unwrap();
    assert!(svg.starts_with("<svg "), "{}", &svg[..80]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 8 * 3);
    assert!(dir.join("summary.csv").is_file());
    assert!(dir.join("burst-trace.csv").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_csv_trace_is_played_and_a_bad_line_is_named() {
    let dir = temp_dir("simulate-csv");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("rooms.csv");
    std::fs::write(
        &good,
        "arrival_seconds,kind,duration_seconds,room\n0,room_composite,600,a\n5,track,300,b\n5,audio_room_composite,900,c\n",
    )
    .unwrap();
    let output = simulate(&[
        "--trace",
        good.to_str().unwrap(),
        "--policy",
        "egress-scaler,oracle",
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(text.contains("trace rooms: 3 requests"), "{text}");
    assert!(
        !text.contains("hpa-cpu"),
        "only the policies asked for:\n{text}"
    );

    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "0,room_composite,600,a\n7,video,60,b\n").unwrap();
    let output = simulate(&["--trace", bad.to_str().unwrap()]);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("line 2: unknown egress kind \"video\""),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_ceiling_and_the_cluster_tolerance_show_in_the_table() {
    // Without flags the table plays the shipped files: a ceiling of 40, too low for a burst of
    // 100 room composites.
    let output = simulate(&["--trace", "burst", "--policy", "egress-scaler"]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(text.contains("ceiling 40, tolerance 0.1 unless"), "{text}");
    assert!(
        text.contains("the ceiling here, 40, is too low: requests wait for recordings to end"),
        "{text}"
    );
    let output = simulate(&[
        "--trace",
        "burst",
        "--policy",
        "egress-scaler",
        "--no-per-hpa-tolerance",
        "--scaler-outage",
        "600-900",
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(
        text.contains("tolerance 0.1 (the ScaledObject's ignored)"),
        "{text}"
    );
}

#[test]
fn a_scaled_object_file_is_played_and_a_bad_one_is_named() {
    let dir = temp_dir("simulate-scaled-object");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("so.yaml");
    std::fs::write(
        &good,
        "kind: ScaledObject\nspec:\n  maxReplicaCount: 12\n  triggers:\n    - type: external-push\n",
    )
    .unwrap();
    let output = simulate(&[
        "--trace",
        "night",
        "--policy",
        "egress-scaler",
        "--scaled-object",
        good.to_str().unwrap(),
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(text.contains("ceiling 12"), "{text}");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "kind: ScaledObject\nspec:\n  fallback:\n    failureThreshold: 3\n    replicas: 1\n    behavior: sometimes\n").unwrap();
    let output = simulate(&["--scaled-object", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let error = stderr(&output);
    assert!(
        error.contains("invalid setting --scaled-object")
            && error.contains("spec.fallback.behavior"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_flags_exit_2_naming_the_setting() {
    for (args, expected) in [
        (vec!["--trace", "weekend"], "invalid setting --trace"),
        (vec!["--policy", "hpa-memory"], "invalid setting --policy"),
        (vec!["--sweep", "warm-pool=3..1"], "invalid setting --sweep"),
        (
            vec!["--sweep", "replicas=1,2"],
            "unknown setting \"replicas\"",
        ),
        (
            vec!["--p99-under", "5"],
            "invalid setting --p99-under: needs --sweep",
        ),
        (vec!["--cold-start=-1"], "invalid setting --cold-start"),
        (vec!["--cost", "track=lots"], "invalid setting --cost"),
        (vec!["--cpu-target", "1.5"], "invalid setting --cpu-target"),
        (
            vec!["--hpa-tolerance", "1.5"],
            "invalid setting --hpa-tolerance",
        ),
        (
            vec!["--scaler-outage", "9-3"],
            "invalid setting --scaler-outage",
        ),
        (
            vec!["--max-replicas", "0"],
            "invalid setting --max-replicas",
        ),
    ] {
        let output = simulate(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let error = stderr(&output);
        assert!(error.contains(expected), "{args:?}: {error}");
    }
}
