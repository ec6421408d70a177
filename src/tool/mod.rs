//! Warm command-line tools (`record --tool`, `run SNAP -- ARGS`).
//!
//! A tool is recorded under a small launcher warmstart ships for its runtime (Python's
//! is `py_tool.py`, run with `python3 -c`): the launcher loads what the tool's entry
//! point imports, runs the `--prime-args` runs, names every file it loaded and says it is
//! warm on the notify channel (`--ready notify`). Each restored instance reads its
//! request there, after `RESTORED=1`: `TOOL <len>\n` and a JSON object with the run's
//! `args`, `cwd`, `env` and `umask` (its stdio is the caller's, as for any `run`), and
//! runs the entry point as a cold start would, exiting with the tool's status.
//!
//! A snapshot is never stale: a `run` first checks every file the tool loaded while it
//! warmed up (size, mtime and inode, then the content hash); after any change it runs
//! the tool cold this time, says so once, and records it again in the background.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{FileIdentity, ToolInfo};

mod java;

/// The Python launcher.
const PY_LAUNCHER: &str = include_str!("py_tool.py");
/// The Node launcher.
const NODE_LAUNCHER: &str = include_str!("node_tool.js");

/// The runtime a tool runs in, and so its launcher.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runtime {
    Python,
    Node,
    Java,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Node => "node",
            Runtime::Java => "java",
        }
    }

    /// The interpreter's option that runs code given on the command line, and the code.
    fn launcher(self) -> [&'static str; 2] {
        match self {
            Runtime::Python => ["-c", PY_LAUNCHER],
            Runtime::Node => ["-e", NODE_LAUNCHER],
            Runtime::Java => unreachable!("the Java launcher is a class (java::place)"),
        }
    }
}

/// The arguments `command` gives the tool itself: what follows its launch form (`python3
/// -m black --check x.py` → `--check x.py`).
pub fn args_after_form(command: &[String]) -> Result<Vec<String>> {
    Ok(plan(command, &[], false)?.2)
}

/// How `record --tool` starts `command`: the launcher command line, the tool's
/// description (its files are added at the warm point) and the tool's own arguments.
/// `build`: build a launcher that must be (Java's) when it is not yet; without it the
/// command line names a placeholder for it.
pub fn plan(
    command: &[String],
    prime_args: &[String],
    build: bool,
) -> Result<(Vec<String>, ToolInfo, Vec<String>)> {
    let Some(cmd) = command.first() else {
        bail!("no command given: usage is `warmstart record --tool -- CMD ARGS...`");
    };
    // A version manager's shim (pyenv, nodenv, ...) is a shell script in front of the
    // tool: the tool is what it runs.
    if let Some(real) = crate::bench::unshim(cmd) {
        let mut real_command = command.to_vec();
        real_command[0] = real;
        return plan(&real_command, prime_args, build);
    }
    let program = crate::record::resolve(cmd)?;
    let program = PathBuf::from(std::ffi::OsStr::from_bytes(program.as_bytes()));
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The interpreter and its options, then the form: `-m MOD` or a script.
    let (interp, rest): (Vec<String>, &[String]) = if name.starts_with("python") {
        (vec![cmd.clone()], &command[1..])
    } else if name == "java" {
        let p = java::place(cmd, &program, &command[1..], build)?;
        let info = ToolInfo {
            runtime: Runtime::Java.name().into(),
            command: command.to_vec(),
            prime_args: prime_args.to_vec(),
            cold_prefix: p.cold_prefix,
            argv0: p.argv0,
            files: Vec::new(),
            startup_env: startup_env(Runtime::Java, std::env::vars_os()),
        };
        return Ok((p.launcher, info, p.args));
    } else if name == "node" || name == "nodejs" {
        return node_plan(
            command,
            prime_args,
            std::slice::from_ref(cmd),
            &command[1..],
        );
    } else if let Some(interp) = shebang(&program, |n| n == "node" || n == "nodejs") {
        // An npm bin link (or any script run directly by node).
        return Ok(finish(
            Runtime::Node,
            command,
            prime_args,
            &interp,
            &[],
            Form::Script(program.to_string_lossy().into_owned()),
            &command[1..],
        ));
    } else if let Some(interp) = python_shebang(&program) {
        // A console script (pip's entry-point wrapper) or any Python script run directly.
        let mut v = interp;
        v.push(program.to_string_lossy().into_owned());
        let script = program.to_string_lossy().into_owned();
        return Ok(finish(
            Runtime::Python,
            command,
            prime_args,
            &v[..v.len() - 1],
            &[],
            Form::Script(script),
            &command[1..],
        ));
    } else {
        bail!(
            "record --tool: cannot place the entry point of {cmd}: it knows `python3 -m MOD \
             ARGS`, `python3 SCRIPT ARGS`, Python console scripts, `node SCRIPT ARGS` and npm \
             bin links, `java -cp CP CLASS ARGS` and `java -jar JAR ARGS`; record it without \
             --tool"
        );
    };
    let mut opts = Vec::new();
    let mut i = 0;
    let form = loop {
        let Some(a) = rest.get(i) else {
            bail!(
                "record --tool: `{}` runs no module or script (an interactive interpreter is \
                 not a tool)",
                command.join(" ")
            );
        };
        match a.as_str() {
            "-m" => {
                let m = rest
                    .get(i + 1)
                    .ok_or_else(|| anyhow!("record --tool: -m without a module"))?;
                i += 2;
                break Form::Module(m.clone());
            }
            "-c" => {
                bail!("record --tool: `python -c CODE` is not a tool; put the code in a script")
            }
            "-" => bail!("record --tool: a script read from stdin is not a tool"),
            // Options that take a value.
            "-W" | "-X" | "--check-hash-based-pycs" => {
                opts.extend(rest[i..(i + 2).min(rest.len())].iter().cloned());
                i += 2;
            }
            o if o.starts_with('-') => {
                opts.push(o.to_owned());
                i += 1;
            }
            script => {
                i += 1;
                break Form::Script(script.to_owned());
            }
        }
    };
    Ok(finish(
        Runtime::Python,
        command,
        prime_args,
        &interp,
        &opts,
        form,
        &rest[i..],
    ))
}

/// `node [OPTIONS] SCRIPT ARGS`: the interpreter's options kept, the script its form.
fn node_plan(
    command: &[String],
    prime_args: &[String],
    interp: &[String],
    rest: &[String],
) -> Result<(Vec<String>, ToolInfo, Vec<String>)> {
    let mut opts = Vec::new();
    let mut i = 0;
    let script = loop {
        let Some(a) = rest.get(i) else {
            bail!(
                "record --tool: `{}` runs no script (an interactive interpreter is not a tool)",
                command.join(" ")
            );
        };
        match a.as_str() {
            "-e" | "--eval" | "-p" | "--print" => {
                bail!("record --tool: `node {a} CODE` is not a tool; put the code in a script")
            }
            "-" => bail!("record --tool: a script read from stdin is not a tool"),
            // Options that take a value.
            "-r"
            | "--require"
            | "--import"
            | "--loader"
            | "--experimental-loader"
            | "--conditions"
            | "-C"
            | "--title" => {
                opts.extend(rest[i..(i + 2).min(rest.len())].iter().cloned());
                i += 2;
            }
            o if o.starts_with('-') => {
                opts.push(o.to_owned());
                i += 1;
            }
            s => {
                i += 1;
                break s.to_owned();
            }
        }
    };
    Ok(finish(
        Runtime::Node,
        command,
        prime_args,
        interp,
        &opts,
        Form::Script(script),
        &rest[i..],
    ))
}

enum Form {
    Module(String),
    Script(String),
}

fn finish(
    runtime: Runtime,
    command: &[String],
    prime_args: &[String],
    interp: &[String],
    opts: &[String],
    form: Form,
    args: &[String],
) -> (Vec<String>, ToolInfo, Vec<String>) {
    let mut cold_prefix: Vec<String> = interp.iter().chain(opts).cloned().collect();
    let mut cmd = cold_prefix.clone();
    // The launcher's code on the command line: no file to keep (or to hide under a
    // private /tmp).
    cmd.extend(runtime.launcher().map(str::to_owned));
    let argv0 = match &form {
        Form::Module(m) => {
            cold_prefix.extend(["-m".to_owned(), m.clone()]);
            cmd.extend(["module".to_owned(), m.clone()]);
            format!("-m {m}")
        }
        Form::Script(s) => {
            cold_prefix.push(s.clone());
            cmd.extend(["script".to_owned(), s.clone()]);
            s.clone()
        }
    };
    cmd.push("--".into());
    cmd.extend(args.iter().cloned());
    let info = ToolInfo {
        runtime: runtime.name().into(),
        command: command.to_vec(),
        prime_args: prime_args.to_vec(),
        cold_prefix,
        argv0,
        files: Vec::new(),
        startup_env: startup_env(runtime, std::env::vars_os()),
    };
    (cmd, info, args.to_vec())
}

/// Whether the runtime reads variable `name` at its start, before the tool's entry point
/// (or its modules at load time): the locale, the time zone, the runtime's own options and
/// search paths. A warm run would keep the recorded value.
fn read_at_start(runtime: Runtime, name: &str) -> bool {
    matches!(name, "LANG" | "LANGUAGE" | "TZ")
        || name.starts_with("LC_")
        || match runtime {
            Runtime::Python => name.starts_with("PYTHON"),
            Runtime::Node => {
                name.starts_with("NODE_")
                    || matches!(
                        name,
                        "UV_THREADPOOL_SIZE" | "OPENSSL_CONF" | "SSL_CERT_FILE"
                    )
            }
            Runtime::Java => matches!(
                name,
                "JAVA_TOOL_OPTIONS" | "JDK_JAVA_OPTIONS" | "_JAVA_OPTIONS" | "CLASSPATH"
            ),
        }
}

/// The variables of `env` the runtime reads at its start ([`read_at_start`]), sorted.
fn startup_env<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    runtime: Runtime,
    env: impl IntoIterator<Item = (K, V)>,
) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| {
            (
                k.as_ref().to_string_lossy().into_owned(),
                v.as_ref().to_string_lossy().into_owned(),
            )
        })
        .filter(|(k, _)| read_at_start(runtime, k) && !k.starts_with("WARMSTART_"))
        .collect();
    v.sort();
    v
}

/// The first variable the runtime reads at its start whose value in `env` (a run's
/// environment) differs from the record's: its name and both values (`None`: unset).
fn startup_env_change(
    tool: &ToolInfo,
    env: &[(String, String)],
) -> Option<(String, Option<String>, Option<String>)> {
    let runtime = match tool.runtime.as_str() {
        "python" => Runtime::Python,
        "node" => Runtime::Node,
        "java" => Runtime::Java,
        _ => return None,
    };
    let now = startup_env(runtime, env.iter().map(|(k, v)| (k, v)));
    let get =
        |v: &[(String, String)], k: &str| v.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let mut names: Vec<String> = now
        .iter()
        .chain(&tool.startup_env)
        .map(|(k, _)| k.clone())
        .collect();
    names.sort();
    names.dedup();
    names.into_iter().find_map(|k| {
        let (then, here) = (get(&tool.startup_env, &k), get(&now, &k));
        (then != here).then_some((k, then, here))
    })
}

/// The interpreter of a `#!` line naming Python (`/usr/bin/env python3` included).
fn python_shebang(path: &Path) -> Option<Vec<String>> {
    shebang(path, |n| n.starts_with("python"))
}

/// The interpreter (and its words) of a `#!` line whose program's name `is` accepts,
/// `/usr/bin/env PROGRAM` included.
fn shebang(path: &Path, is: impl Fn(&str) -> bool) -> Option<Vec<String>> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let line = head[..n].split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line.strip_prefix(b"#!")?).ok()?;
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    let named = |w: &str| {
        Path::new(w)
            .file_name()
            .is_some_and(|n| is(&n.to_string_lossy()))
    };
    match words.as_slice() {
        [env, prog, ..] if env.ends_with("/env") && named(prog) => Some(words[1..].to_vec()),
        [prog, ..] if named(prog) => Some(words),
        _ => None,
    }
}

/// What identifies each file the tool loaded (its content hash included).
pub fn identities(files: &[String]) -> Vec<FileIdentity> {
    let mut out = Vec::new();
    for f in files {
        let Ok(meta) = std::fs::metadata(f) else {
            continue;
        };
        let mut id = crate::fds::identity(f, &meta);
        id.hash = std::fs::File::open(f)
            .ok()
            .and_then(|r| FileIdentity::hash_of(r).ok());
        out.push(id);
    }
    out
}

/// The first file the tool loaded that changed since the record (`None`: none did).
pub fn changed_file(tool: &ToolInfo) -> Option<(String, &'static str)> {
    use std::os::unix::fs::MetadataExt;
    for f in &tool.files {
        let Ok(meta) = std::fs::metadata(&f.path) else {
            return Some((f.path.clone(), "is gone"));
        };
        let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        if meta.ino() == f.ino
            && meta.dev() == f.dev
            && meta.size() == f.size
            && mtime == f.mtime_ns
        {
            continue;
        }
        let same = f.hash.is_some()
            && std::fs::File::open(&f.path)
                .ok()
                .and_then(|r| FileIdentity::hash_of(r).ok())
                == f.hash;
        if !same {
            return Some((f.path.clone(), "changed"));
        }
    }
    None
}

/// Why tool `info` cannot run warm with `request` (from [`request`]): a start-up
/// variable that differs from the record's, or a file of the tool that changed (what
/// [`run_stale_or_check`] handles). A `serve` daemon asks before it hands out an
/// instance.
pub fn not_warm(info: &ToolInfo, request: &[u8]) -> Option<String> {
    let env = match request_env(request) {
        Ok(env) => env,
        Err(e) => return Some(format!("unreadable tool request: {e:#}")),
    };
    if let Some((var, _, _)) = startup_env_change(info, &env) {
        return Some(format!("{var} differs from the record's"));
    }
    changed_file(info).map(|(path, how)| format!("stale: {path} {how} since the record"))
}

/// The environment of a [`request`].
fn request_env(request: &[u8]) -> Result<Vec<(String, String)>> {
    let body = request
        .iter()
        .position(|&b| b == b'\n')
        .map(|nl| &request[nl + 1..])
        .ok_or_else(|| anyhow!("no header line"))?;
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let env = v
        .get("env")
        .and_then(|e| e.as_object())
        .ok_or_else(|| anyhow!("no environment"))?;
    Ok(env
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect())
}

/// The request a restored instance reads after `RESTORED=1`.
pub fn request(args: &[String], env: &[(String, String)]) -> Result<Vec<u8>> {
    let cwd = std::env::current_dir().context("the working directory of this run")?;
    // SAFETY: umask is a plain syscall; it is set back at once (there is no way to read
    // the mask without setting it).
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    let env: serde_json::Map<String, serde_json::Value> = env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "args": args,
        "cwd": cwd.to_string_lossy(),
        "env": env,
        "umask": umask,
    }))?;
    // Written into the notify socket before the instance runs: it must fit its buffer.
    if body.len() > 128 << 10 {
        bail!(
            "the request for the tool ({} bytes of arguments and environment) is over \
             128 KiB: pass fewer variables (--clear-env, --env K=V)",
            body.len()
        );
    }
    let mut out = format!("TOOL {}\n", body.len()).into_bytes();
    out.extend(body);
    Ok(out)
}

/// The environment a tool run gets: the caller's (or none with `--clear-env`), then the
/// `--env K=V` settings.
pub fn run_env(a: &crate::cli::RunArgs) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = if a.clear_env {
        Vec::new()
    } else {
        std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect()
    };
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {kv:?}: expected K=V"))?;
        env.retain(|(x, _)| x != k);
        env.push((k.to_owned(), v.to_owned()));
    }
    Ok(env)
}

/// Before a `run` of a snapshot: arguments to a snapshot that is not a tool are refused;
/// a tool whose files changed runs cold (`--stale cold`, and is recorded again in the
/// background) or is refused (`--stale fail`). `Some(status)`: it ran cold.
pub fn run_stale_or_check(
    cli: &crate::cli::Cli,
    a: &crate::cli::RunArgs,
    snap: &warmstart_snapshots::store::Snapshot,
    names: &[String],
) -> Result<Option<i32>> {
    let Some(tool) = &snap.manifest.tool else {
        if !a.args.is_empty() || !a.env.is_empty() || a.clear_env {
            bail!(
                "snapshot {} was not recorded with --tool: it takes no arguments or \
                 environment (record the command with `warmstart record --tool`)",
                a.snapshot
            );
        }
        return Ok(None);
    };
    if !matches!(a.stale.as_str(), "cold" | "fail") {
        bail!("--stale {:?}: expected cold or fail", a.stale);
    }
    if let Some((var, then, here)) = startup_env_change(tool, &run_env(a)?) {
        let show = |v: &Option<String>| v.as_ref().map_or("unset".to_owned(), |v| format!("{v:?}"));
        let why = format!(
            "{var} is {} here and was {} at the record; the {} runtime reads it at its \
             start, so a warm run would keep the recorded value",
            show(&here),
            show(&then),
            tool.runtime
        );
        if a.stale == "fail" {
            bail!(
                "snapshot {} cannot run warm: {why} (--stale fail); record it again with \
                 this environment",
                a.snapshot
            );
        }
        eprintln!(
            "warmstart: {}: {why}: running the tool cold (record it again with this \
             environment to run it warm)",
            a.snapshot
        );
        return run_cold(&tool.cold_prefix, a).map(Some);
    }
    let Some((path, how)) = changed_file(tool) else {
        return Ok(None);
    };
    if a.stale == "fail" {
        bail!(
            "snapshot {} is stale: {path} {how} since the record (--stale fail); record it \
             again with `warmstart record --tool`",
            a.snapshot
        );
    }
    eprintln!(
        "warmstart: {} is stale ({path} {how} since the record): running the tool cold, \
         recording it again in the background",
        a.snapshot
    );
    let cwd = snap
        .manifest
        .processes
        .first()
        .map_or("/", |p| p.cwd.as_str());
    rerecord(cli, names, cwd, tool, &recorded_with(&snap.manifest));
    run_cold(&tool.cold_prefix, a).map(Some)
}

/// Runs `prefix` + the run's arguments as a plain process, with the run's environment
/// settings; its exit status (128+N for a signal).
pub fn run_cold(prefix: &[String], a: &crate::cli::RunArgs) -> Result<i32> {
    let (program, rest) = prefix
        .split_first()
        .ok_or_else(|| anyhow!("no command to run the tool cold"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest).args(&a.args);
    if a.clear_env {
        cmd.env_clear();
    }
    for (k, v) in a.env.iter().filter_map(|kv| kv.split_once('=')) {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {} cold", prefix.join(" ")))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

/// `warmstart shim SNAP --dir DIR`: writes `DIR/NAME`, a shell script that runs the tool
/// snapshot warm with its arguments, or cold when warmstart, its store or the snapshot
/// cannot be used (the cold command is written into it).
pub fn write_shim(
    cli: &crate::cli::Cli,
    snapshot: &str,
    dir: &Path,
    name: Option<&str>,
) -> Result<i32> {
    let store = crate::cli::open_store_for(cli)?;
    let id = store.resolve(snapshot)?;
    let snap = store.load(&id)?;
    let Some(tool) = &snap.manifest.tool else {
        bail!(
            "snapshot {snapshot} was not recorded with --tool: a shim runs a tool snapshot \
             (record the command with `warmstart record --tool`)"
        );
    };
    let name = name.unwrap_or(snapshot);
    if name.is_empty() || name.contains('/') {
        bail!("shim name {name:?}: a file name, no slashes");
    }
    if !dir.is_dir() {
        bail!("--dir {}: not a directory", dir.display());
    }
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let exe = std::env::current_exe().context("the path of warmstart")?;
    let exe = q(&exe.to_string_lossy());
    let store_dir = std::fs::canonicalize(store.dir()).unwrap_or_else(|_| store.dir().to_owned());
    let cold: Vec<String> = tool.cold_prefix.iter().map(|w| q(w)).collect();
    let or_cold: Vec<String> = tool
        .cold_prefix
        .iter()
        .map(|w| format!("--or-cold={}", q(w)))
        .collect();
    let script = format!(
        "#!/bin/sh\n\
         # Written by `warmstart shim`: runs tool snapshot {snapshot} warm, or the tool cold\n\
         # when warmstart, its store or the snapshot cannot be used.\n\
         if [ -x {exe} ]; then\n\
         \x20   exec {exe} --store {} run {} {} -- \"$@\"\n\
         fi\n\
         exec {} \"$@\"\n",
        q(&store_dir.to_string_lossy()),
        or_cold.join(" "),
        q(snapshot),
        cold.join(" "),
    );
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.warmstart-{}", std::process::id()));
    std::fs::write(&tmp, script).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .with_context(|| format!("making {} executable", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(0)
}

/// The `record` options a snapshot was recorded with, as its manifest shows them, so a
/// re-record gives the same kind of snapshot: `--reproducible` (the app's personality),
/// `--share-tmp` (no private `/tmp`), `--uts`, `--ipc`, `--net private` (namespaces of
/// its own) and `--cpu-baseline`.
fn recorded_with(m: &warmstart_snapshots::model::Manifest) -> Vec<String> {
    let mut opts = Vec::new();
    if m.processes
        .first()
        .is_some_and(|p| p.personality & libc::ADDR_NO_RANDOMIZE as u32 != 0)
    {
        opts.push("--reproducible".to_owned());
    }
    if m.private_tmp.is_none() {
        opts.push("--share-tmp".to_owned());
    }
    if m.namespaces.uts.is_some() {
        opts.push("--uts".to_owned());
    }
    if m.namespaces.ipc.is_some() {
        opts.push("--ipc".to_owned());
    }
    if m.namespaces.net.is_some() {
        opts.extend(["--net".to_owned(), "private".to_owned()]);
    }
    if let Some(level) = &m.host.cpu_baseline {
        opts.extend(["--cpu-baseline".to_owned(), level.clone()]);
    }
    opts
}

/// `warmstart record --tool` of the same command again, with the options the record
/// before had ([`recorded_with`]), detached (its own session, no stdio), under the
/// snapshot's name when it has one.
fn rerecord(
    cli: &crate::cli::Cli,
    names: &[String],
    cwd: &str,
    tool: &ToolInfo,
    recorded_with: &[String],
) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    if let Some(s) = &cli.store {
        cmd.arg("--store").arg(s);
    }
    cmd.args(["record", "--tool"]).args(recorded_with);
    if let Some(n) = names.first() {
        cmd.args(["--name", n]);
    }
    for p in &tool.prime_args {
        cmd.arg("--prime-args").arg(p);
    }
    cmd.arg("--").args(&tool.command);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    // Where it was recorded (a relative script path is relative to it).
    cmd.current_dir(cwd);
    let _ = cmd.spawn();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_its_environment() {
        let env = vec![("PYTHONPATH".to_owned(), "/x".to_owned())];
        let req = request(&s(&["a", "b"]), &env).unwrap();
        assert_eq!(request_env(&req).unwrap(), env);
        assert!(request_env(b"TOOL 3\n{}").is_err());
        assert!(request_env(b"garbage").is_err());
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn plan_(command: &[String], prime: &[String]) -> Result<(Vec<String>, ToolInfo)> {
        plan(command, prime, false).map(|(c, i, _)| (c, i))
    }

    #[test]
    fn python_forms_are_placed() {
        let d = tempfile::tempdir().unwrap();
        // A version manager's shim is seen through (pyenv's python3 on these machines).
        let py = crate::bench::unshim("python3").unwrap_or_else(|| "python3".into());
        let py = py.as_str();
        let (cmd, info) = plan_(&s(&["python3", "-B", "-m", "json.tool", "x"]), &[]).unwrap();
        assert_eq!(info.cold_prefix, s(&[py, "-B", "-m", "json.tool"]));
        assert_eq!(&cmd[..2], &s(&[py, "-B"])[..]);
        assert_eq!(cmd[2], "-c");
        assert_eq!(&cmd[4..], &s(&["module", "json.tool", "--", "x"])[..]);
        let (cmd, info) = plan_(&s(&["python3", "tool.py", "-v"]), &[]).unwrap();
        assert_eq!(info.cold_prefix, s(&[py, "tool.py"]));
        assert_eq!(&cmd[3..], &s(&["script", "tool.py", "--", "-v"])[..]);
        let script = d.path().join("wrapper");
        std::fs::write(&script, "#!/usr/bin/env python3\nimport sys\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let p = script.to_str().unwrap();
        let (cmd, info) = plan_(&s(&[p, "a"]), &[]).unwrap();
        assert_eq!(info.cold_prefix, s(&["python3", p]));
        assert_eq!(cmd[0], "python3");
        assert_eq!(&cmd[3..], &s(&["script", p, "--", "a"])[..]);
    }

    #[test]
    fn a_rerecord_has_the_options_the_record_had() {
        use clap::Parser;
        use warmstart_snapshots::model::{IpcNs, Manifest, NetNs, Process, UtsNs};
        let parse = |m: &Manifest| {
            let mut argv = s(&["warmstart", "record", "--tool"]);
            argv.extend(recorded_with(m));
            argv.extend(s(&["--", "python3", "-m", "black"]));
            match crate::cli::Cli::try_parse_from(argv).unwrap().command {
                crate::cli::Command::Record(a) => a.0,
                c => panic!("{c:?}"),
            }
        };
        // The defaults: private /tmp, the host's namespaces, ASLR on, every CPU feature.
        let mut m = Manifest {
            private_tmp: Some(Vec::new()),
            processes: vec![Process::default()],
            ..Manifest::default()
        };
        assert!(recorded_with(&m).is_empty());
        let a = parse(&m);
        assert!(!a.share_tmp && !a.reproducible && !a.uts && !a.ipc);
        assert_eq!((a.net.as_str(), a.cpu_baseline), ("host", None));
        // Everything otherwise.
        m.private_tmp = None;
        m.processes[0].personality = libc::ADDR_NO_RANDOMIZE as u32;
        m.namespaces.uts = Some(UtsNs::default());
        m.namespaces.ipc = Some(IpcNs::default());
        m.namespaces.net = Some(NetNs::default());
        m.host.cpu_baseline = Some("x86-64-v2".into());
        let a = parse(&m);
        assert!(a.share_tmp && a.reproducible && a.uts && a.ipc && a.tool);
        assert_eq!(a.net, "private");
        assert_eq!(
            a.cpu_baseline,
            Some(crate::sys::cpuid::Baseline::parse("x86-64-v2").unwrap())
        );
    }

    #[test]
    fn a_changed_startup_variable_is_named() {
        let env = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let tool = ToolInfo {
            runtime: "python".into(),
            startup_env: startup_env(
                Runtime::Python,
                env(&[("PYTHONPATH", "/a"), ("HOME", "/root"), ("LANG", "C")]),
            ),
            ..Default::default()
        };
        assert_eq!(
            tool.startup_env,
            env(&[("LANG", "C"), ("PYTHONPATH", "/a")])
        );
        let same = env(&[
            ("PYTHONPATH", "/a"),
            ("LANG", "C"),
            ("HOME", "/x"),
            ("CI", "1"),
        ]);
        assert_eq!(startup_env_change(&tool, &same), None);
        let other = env(&[("PYTHONPATH", "/b"), ("LANG", "C")]);
        assert_eq!(
            startup_env_change(&tool, &other),
            Some(("PYTHONPATH".into(), Some("/a".into()), Some("/b".into())))
        );
        let more = env(&[("PYTHONPATH", "/a"), ("LANG", "C"), ("LC_ALL", "C")]);
        assert_eq!(
            startup_env_change(&tool, &more),
            Some(("LC_ALL".into(), None, Some("C".into())))
        );
        // NODE_OPTIONS means nothing to Python.
        let node = env(&[("PYTHONPATH", "/a"), ("LANG", "C"), ("NODE_OPTIONS", "-x")]);
        assert_eq!(startup_env_change(&tool, &node), None);
    }

    #[test]
    fn other_commands_are_refused_with_the_forms() {
        let e = plan_(&s(&["true"]), &[]).unwrap_err().to_string();
        assert!(e.contains("python3 -m MOD"), "{e}");
        let e = plan_(&s(&["python3", "-c", "1"]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("-c"), "{e}");
        let e = plan_(&s(&["python3"]), &[]).unwrap_err().to_string();
        assert!(e.contains("runs no module or script"), "{e}");
    }
}
