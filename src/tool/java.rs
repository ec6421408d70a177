//! Java tools: `java [OPTIONS] -cp CP CLASS ARGS`, `java [OPTIONS] CLASS ARGS` (the class
//! path from `CLASSPATH` or `.`) and `java [OPTIONS] -jar JAR ARGS`, run under warmstart's
//! Java launcher (`JavaTool.java`, compiled once per JDK with the JDK's own `javac` into
//! `$XDG_CACHE_HOME/warmstart/launchers`, by default `~/.cache/warmstart/launchers`: out of
//! `/tmp`, which `record` replaces with the app's own).
//!
//! The launcher changes the JVM's working directory, umask and C environment through the
//! JDK 17 foreign-function API (Java has no call for them), so it needs JDK 17: other JDKs
//! are refused by name at the record.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The launcher's source.
pub const SOURCE: &str = include_str!("JavaTool.java");
/// The launcher's main class.
const MAIN: &str = "warmstart.launcher.JavaTool";
/// Where a launcher goes when only the command line is wanted (nothing is built).
const UNBUILT: &str = "<launcher>";

/// What the command runs: a main class on a class path, or a jar's.
enum Target {
    Main { class: String },
    Jar { jar: String },
}

/// The parts of a `java` command line.
pub struct Placed {
    /// The command that runs the tool cold (before its arguments).
    pub cold_prefix: Vec<String>,
    /// The tool's `argv[0]` as a cold start names it in `sun.java.command`.
    pub argv0: String,
    /// The launcher's command line (before the tool's arguments).
    pub launcher: Vec<String>,
    /// The tool's arguments.
    pub args: Vec<String>,
}

/// Places `java ...` (`interp` is the `java` word as given, `rest` what follows it).
/// With `build`, the launcher is built when it is not yet.
pub fn place(interp: &str, program: &Path, rest: &[String], build: bool) -> Result<Placed> {
    let cwd = std::env::current_dir().context("the working directory of the record")?;
    let absolute = |p: &str| -> String {
        let p = if p.is_empty() { "." } else { p };
        let joined = cwd.join(p);
        // `a/./b` and `a/b/..` as the JVM resolves them (no symlinks followed).
        let mut out = PathBuf::new();
        for c in joined.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        out.to_string_lossy().into_owned()
    };
    let abs_cp = |cp: &str| -> String { cp.split(':').map(absolute).collect::<Vec<_>>().join(":") };
    let mut opts = Vec::new();
    let mut class_path: Option<String> = None;
    let mut i = 0;
    let target = loop {
        let Some(a) = rest.get(i) else {
            bail!("record --tool: `java` runs no class or jar (give `-cp CP CLASS` or `-jar JAR`)");
        };
        let value = |i: usize| -> Result<String> {
            rest.get(i + 1)
                .cloned()
                .ok_or_else(|| anyhow!("record --tool: `java {a}` without its value"))
        };
        match a.as_str() {
            "-cp" | "-classpath" | "--class-path" => {
                class_path = Some(value(i)?);
                i += 2;
            }
            "-jar" => {
                let jar = value(i)?;
                i += 2;
                break Target::Jar {
                    jar: absolute(&jar),
                };
            }
            "-m" | "--module" => bail!(
                "record --tool: `java {a} MODULE` (a module's main class) is not supported; \
                 run its class with `-cp` or `-p ... -cp`, or record it without --tool"
            ),
            "--source" => bail!(
                "record --tool: source-file mode (`java --source N FILE.java`) compiles the \
                 tool at each start; compile it and record `java -cp DIR CLASS`"
            ),
            "-version" | "--version" | "-showversion" | "--show-version" | "-help" | "-h"
            | "-?" | "--help" | "-X" | "--help-extra" | "--dry-run" | "--list-modules" | "-d"
            | "--describe-module" | "--validate-modules" => bail!(
                "record --tool: `java {a}` prints or checks at the JVM's start, which a warm \
                 run does not repeat; leave it out"
            ),
            o if o.starts_with("-XshowSettings") => bail!(
                "record --tool: `java {o}` prints at the JVM's start, which a warm run does \
                 not repeat; leave it out"
            ),
            o if o.starts_with('@') => bail!(
                "record --tool: argument files (`java {o}`) are not supported; give the \
                 options on the command line"
            ),
            // Options whose value is the next word.
            "-p"
            | "--module-path"
            | "--upgrade-module-path"
            | "--add-modules"
            | "--enable-native-access"
            | "--add-opens"
            | "--add-exports"
            | "--add-reads"
            | "--patch-module"
            | "--limit-modules" => {
                opts.push(a.clone());
                opts.push(value(i)?);
                i += 2;
            }
            o if o.starts_with('-') => {
                opts.push(o.to_owned());
                i += 1;
            }
            class => {
                i += 1;
                if class.ends_with(".java") {
                    bail!(
                        "record --tool: source-file mode (`java {class}`) compiles the tool \
                         at each start; compile it and record `java -cp DIR CLASS`"
                    );
                }
                break Target::Main {
                    class: class.to_owned(),
                };
            }
        }
    };
    let args = rest[i..].to_vec();
    // The class path as the JVM takes it: `-jar` ignores -cp and CLASSPATH; otherwise the
    // option, else CLASSPATH, else the working directory.
    let (class_path, mode, name, argv0) = match &target {
        Target::Jar { jar } => (jar.clone(), "jar", jar.clone(), jar.clone()),
        Target::Main { class } => {
            let cp = class_path
                .or_else(|| std::env::var("CLASSPATH").ok())
                .unwrap_or_else(|| ".".into());
            (abs_cp(&cp), "main", class.clone(), class.clone())
        }
    };
    let mut cold_prefix = vec![interp.to_owned()];
    cold_prefix.extend(opts.iter().cloned());
    match &target {
        Target::Jar { jar } => cold_prefix.extend(["-jar".into(), jar.clone()]),
        Target::Main { class } => {
            cold_prefix.extend(["-cp".into(), class_path.clone(), class.clone()])
        }
    }
    let dir = if build {
        launcher_dir(program, &cache_dir()?)?
            .to_string_lossy()
            .into_owned()
    } else {
        UNBUILT.into()
    };
    let mut launcher = vec![interp.to_owned()];
    launcher.extend(opts.iter().cloned());
    launcher.extend([
        "--add-modules".into(),
        "jdk.incubator.foreign".into(),
        "--enable-native-access=ALL-UNNAMED".into(),
        "-cp".into(),
        format!("{class_path}:{dir}"),
        MAIN.into(),
        mode.into(),
        name,
        class_path.clone(),
        "--".into(),
    ]);
    launcher.extend(args.iter().cloned());
    Ok(Placed {
        cold_prefix,
        argv0,
        launcher,
        args,
    })
}

/// The JDK `java` belongs to: its home directory and feature version (17 for 17.0.15).
fn jdk_of(program: &Path) -> Result<(PathBuf, u32)> {
    let real = std::fs::canonicalize(program)
        .with_context(|| format!("resolving {}", program.display()))?;
    let home = real
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("{} is not in a JDK's bin directory", real.display()))?
        .to_owned();
    let release = std::fs::read_to_string(home.join("release")).with_context(|| {
        format!(
            "reading {}/release to learn the JDK's version",
            home.display()
        )
    })?;
    let version = release
        .lines()
        .find_map(|l| l.strip_prefix("JAVA_VERSION="))
        .map(|v| v.trim_matches('"').to_owned())
        .ok_or_else(|| anyhow!("{}/release names no JAVA_VERSION", home.display()))?;
    let feature = version
        .split(['.', '-', '+'])
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| anyhow!("JDK version {version:?} in {}/release", home.display()))?;
    Ok((home, feature))
}

/// Where launchers are built: `$XDG_CACHE_HOME/warmstart/launchers` or
/// `~/.cache/warmstart/launchers`, never under `/tmp` (hidden from the app by its private
/// `/tmp`).
fn cache_dir() -> Result<PathBuf> {
    let base = crate::dirs::cache_home().ok_or_else(|| {
        anyhow!(
            "record --tool: neither XDG_CACHE_HOME nor HOME is set, so there is no place \
                 to build warmstart's Java launcher; set one of them"
        )
    })?;
    let dir = base.join("warmstart/launchers");
    if dir.starts_with("/tmp") {
        bail!(
            "record --tool: warmstart's Java launcher would be built in {}, under /tmp, \
             which the app does not see (it gets a private /tmp); set XDG_CACHE_HOME to a \
             directory out of /tmp",
            dir.display()
        );
    }
    Ok(dir)
}

/// The directory holding the compiled launcher for the JDK of `program`, built with that
/// JDK's `javac` under `cache` when it is not there yet.
fn launcher_dir(program: &Path, cache: &Path) -> Result<PathBuf> {
    let (home, feature) = jdk_of(program)?;
    if feature != 17 {
        bail!(
            "record --tool: Java tools need JDK 17 (warmstart's launcher changes the JVM's \
             working directory and environment with JDK 17's foreign-function API); {} is \
             JDK {feature}",
            home.display()
        );
    }
    let mut h = blake3::Hasher::new();
    h.update(SOURCE.as_bytes());
    h.update(home.as_os_str().as_encoded_bytes());
    let key = h.finalize().to_hex();
    let dir = cache.join(format!("java{feature}-{}", &key[..16]));
    if dir.join("warmstart/launcher/JavaTool.class").is_file() {
        return Ok(dir);
    }
    let javac = home.join("bin/javac");
    if !javac.is_file() {
        bail!(
            "record --tool: building warmstart's Java launcher needs the JDK's javac, and {} \
             is missing (install the full JDK, not only the runtime)",
            javac.display()
        );
    }
    let parent = cache;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let built = compile(&javac, &tmp, &dir);
    let _ = std::fs::remove_dir_all(&tmp);
    built
}

/// Compiles the launcher in `tmp` with `javac` and moves its classes to `dir`.
fn compile(javac: &Path, tmp: &Path, dir: &Path) -> Result<PathBuf> {
    let src = tmp.join("JavaTool.java");
    std::fs::write(&src, SOURCE).with_context(|| format!("writing {}", src.display()))?;
    let classes = tmp.join("classes");
    let out = std::process::Command::new(javac)
        .args([
            "-nowarn",
            "-XDsuppressNotes",
            "--add-modules",
            "jdk.incubator.foreign",
            "-d",
        ])
        .arg(&classes)
        .arg(&src)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", javac.display()))?;
    if !out.status.success() {
        bail!(
            "record --tool: {} could not compile warmstart's Java launcher: {}",
            javac.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Another record may have built it meanwhile: theirs is as good.
    match std::fs::rename(&classes, dir) {
        Ok(()) => Ok(dir.to_owned()),
        Err(_) if dir.join("warmstart/launcher/JavaTool.class").is_file() => Ok(dir.to_owned()),
        Err(e) => Err(e).with_context(|| format!("moving the launcher to {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn forms_are_placed_with_absolute_class_paths() {
        let cwd = std::env::current_dir().unwrap();
        let cwd = cwd.to_string_lossy();
        let p = place(
            "java",
            Path::new("/usr/bin/java"),
            &s(&["-Xss1m", "-cp", "a.jar:./b/../c", "com.x.Main", "-v", "x"]),
            false,
        )
        .unwrap();
        let cp = format!("{cwd}/a.jar:{cwd}/c");
        assert_eq!(p.args, s(&["-v", "x"]));
        assert_eq!(
            p.cold_prefix,
            s(&["java", "-Xss1m", "-cp", &cp, "com.x.Main"])
        );
        assert_eq!(p.argv0, "com.x.Main");
        let tail = &p.launcher[p.launcher.len() - 7..];
        assert_eq!(
            tail,
            &s(&[MAIN, "main", "com.x.Main", &cp, "--", "-v", "x"])[..]
        );
        let p = place(
            "java",
            Path::new("/usr/bin/java"),
            &s(&["-jar", "t.jar"]),
            false,
        )
        .unwrap();
        assert_eq!(p.cold_prefix, s(&["java", "-jar", &format!("{cwd}/t.jar")]));
        assert!(p.args.is_empty());
    }

    #[test]
    fn other_java_commands_are_refused_with_the_reason() {
        let e = |v: &[&str]| {
            place("java", Path::new("/usr/bin/java"), &s(v), false)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(e(&["-m", "m/c"]).contains("module"));
        assert!(e(&["Hello.java"]).contains("source-file mode"));
        assert!(e(&["-version"]).contains("JVM's start"));
        assert!(e(&["-Xmx1g"]).contains("runs no class or jar"));
        assert!(e(&["-cp"]).contains("without its value"));
    }
}
