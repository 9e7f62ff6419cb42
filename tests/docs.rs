//! The README's configuration table and `serve --help` list the same flags and environment
//! variables, so the documentation cannot drift from the code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Variables read without a flag of their own: the log filter of `tracing-subscriber`.
const ENV_WITHOUT_FLAG: [&str; 1] = ["RUST_LOG"];

/// `serve --help`: each flag with its environment variable, if any.
fn help_flags() -> BTreeMap<String, Option<String>> {
    let output = Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        let option = trimmed
            .strip_prefix("-h, ")
            .or_else(|| trimmed.strip_prefix("-V, "))
            .unwrap_or(trimmed);
        if line.starts_with("  ") && option.starts_with("--") && line.len() - trimmed.len() <= 6 {
            let flag = option.split([' ', '=']).next().unwrap().to_owned();
            flags.insert(flag.clone(), None);
            current = Some(flag);
        } else if let (Some(flag), Some(rest)) = (&current, trimmed.strip_prefix("[env: ")) {
            let name = rest.split(['=', ']']).next().unwrap().to_owned();
            flags.insert(flag.clone(), Some(name));
        }
    }
    flags.remove("--help");
    flags.remove("--version");
    flags
}

/// Environment variables the code reads directly (`env.var("…")`), besides clap's.
fn variables_read_in_src() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config.rs"))
            .unwrap();
    source
        .split(".var(\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

/// One row of the README's configuration table: its flags and its variables.
#[derive(Debug)]
struct Row {
    flags: BTreeSet<String>,
    variables: BTreeSet<String>,
}

fn backticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

fn readme_rows() -> Vec<Row> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README has a Configuration section");
    let table = section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2); // header and separator
    table
        .map(|line| {
            let line = line.replace("\\|", "/");
            let cells: Vec<&str> = line.split('|').collect();
            let flags = backticked(cells[1])
                .into_iter()
                .filter_map(|code| code.split(' ').next())
                .filter(|word| word.starts_with("--"))
                .map(str::to_owned)
                .collect();
            let variables = backticked(cells[2])
                .into_iter()
                .map(str::to_owned)
                .collect();
            Row { flags, variables }
        })
        .collect()
}

#[test]
fn the_readme_documents_exactly_the_flags_of_serve() {
    let help = help_flags();
    assert!(help.contains_key("--redis-url"), "{help:?}");
    let rows = readme_rows();
    let documented: BTreeSet<String> = rows.iter().flat_map(|row| row.flags.clone()).collect();
    let in_help: BTreeSet<String> = help.keys().cloned().collect();
    let undocumented: Vec<_> = in_help.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&in_help).collect();
    assert!(
        undocumented.is_empty(),
        "flags of `serve --help` missing from the README's configuration table: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "flags in the README's configuration table that `serve` does not have: {unknown:?}"
    );
}

#[test]
fn the_readme_names_each_flags_environment_variable_and_no_unknown_one() {
    let help = help_flags();
    let rows = readme_rows();
    for (flag, variable) in &help {
        let row = rows
            .iter()
            .find(|row| row.flags.contains(flag))
            .unwrap_or_else(|| panic!("{flag} is not documented"));
        if let Some(variable) = variable {
            assert!(
                row.variables.contains(variable),
                "the README row of {flag} does not name its variable {variable}"
            );
        }
    }
    let from_help: BTreeSet<String> = help.values().flatten().cloned().collect();
    let read_directly = variables_read_in_src();
    assert!(
        read_directly.contains("LIVEKIT_API_KEY"),
        "{read_directly:?}"
    );
    for row in &rows {
        for variable in &row.variables {
            assert!(
                from_help.contains(variable)
                    || read_directly.contains(variable)
                    || ENV_WITHOUT_FLAG.contains(&variable.as_str()),
                "the README documents {variable}, which serve does not read"
            );
        }
    }
    for variable in read_directly {
        assert!(
            rows.iter().any(|row| row.variables.contains(&variable)),
            "serve reads {variable}, which the README's configuration table does not name"
        );
    }
}
