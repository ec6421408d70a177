//! `push`, `pull`, `login`, and `run REF`: snapshots through an OCI registry (the format
//! and the client are `warmstart_snapshots::registry`).

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use warmstart_snapshots::registry::{self, Options, Reference};
use warmstart_snapshots::store::{Snapshot, Store};

use crate::stats::human;

/// How to reach a registry (shared by push, pull, run).
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Plain HTTP to the registry (only for a registry on loopback)
    #[arg(long)]
    pub insecure: bool,
    /// Trust the CA certificates of this PEM file (besides the system's) for the registry
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Take the registry for dead when a connect or an answer takes longer than this
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub registry_timeout: u64,
}

impl RegistryOpts {
    pub fn options(&self) -> Options {
        Options {
            insecure: self.insecure,
            ca_cert: self.ca_cert.clone(),
            credentials: None,
            timeout: Duration::from_secs(self.registry_timeout),
        }
    }
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The snapshot: a name, an id, or a unique prefix of one
    pub snapshot: String,
    /// Where: REGISTRY/REPOSITORY:TAG (e.g. registry.example.com/apps/api:v1)
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryOpts,
    /// Push against this artifact of the same repository (a tag, sha256:DIGEST, or
    /// REGISTRY/REPO:TAG): the pages it has are not uploaded again, nor its index parts
    /// and hot pages where they still serve [default: the tag pushed, if it is there]
    #[arg(long, value_name = "TAG|DIGEST|REF", conflicts_with = "full")]
    pub base: Option<String>,
    /// Upload the whole snapshot, against no base
    #[arg(long)]
    pub full: bool,
    /// Print what was uploaded as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]
    pub reference: String,
    /// Name the snapshot this in the store [default: the repository's last part and the
    /// tag, e.g. api-v1]
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The registry: HOST[:PORT]
    pub registry: String,
    /// User name
    #[arg(short, long)]
    pub username: String,
    /// Read the password from standard input (the only way: never on the command line)
    #[arg(long, required = true)]
    pub password_stdin: bool,
}

fn parse(s: &str) -> Result<Reference> {
    Reference::parse(s).map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn push(store: &Store, a: &PushArgs) -> Result<i32> {
    let r = parse(&a.reference)?;
    let id = store.resolve(&a.snapshot)?;
    let snap = store.load(&id)?;
    let start = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let named = a
        .base
        .as_deref()
        .map(|b| base_reference(&r, b))
        .transpose()?;
    let base = match (&named, a.full) {
        (_, true) => registry::PushBase::None,
        (None, false) => registry::PushBase::IfThere(&r),
        (Some(b), false) => registry::PushBase::Named(b),
    };
    let rep = registry::push(&snap, &r, base, &a.registry.options(), threads, |_, _| {})
        .with_context(|| format!("cannot push snapshot {} to {r}", id.short()))?;
    let t = start.elapsed();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "id": id.to_hex(),
                "reference": r.to_string(),
                "digest": rep.manifest_digest,
                "blobs": rep.blobs,
                "blobs_uploaded": rep.blobs_uploaded,
                "bytes": rep.bytes,
                "bytes_uploaded": rep.bytes_uploaded,
                "against": rep.against,
                "seconds": t.as_secs_f64(),
            })
        );
    } else {
        let against = (rep.against.as_ref()).map_or(String::new(), |b| format!(" against {b}"));
        println!(
            "pushed {} to {r}{against} ({}): {} of {} blobs uploaded, {} of {} ({:.1}s)",
            id.short(),
            rep.manifest_digest,
            rep.blobs_uploaded,
            rep.blobs,
            human(rep.bytes_uploaded),
            human(rep.bytes),
            t.as_secs_f64()
        );
    }
    Ok(0)
}

/// `--base`: a tag or digest of `r`'s repository, or a whole reference.
fn base_reference(r: &Reference, base: &str) -> Result<Reference> {
    if base.contains('/') {
        return parse(base);
    }
    let mut b = r.clone();
    if base.starts_with("sha256:") {
        (b.tag, b.digest) = (None, Some(base.to_owned()));
    } else {
        (b.tag, b.digest) = (Some(base.to_owned()), None);
    }
    Reference::parse(&b.to_string())
        .map_err(|e| anyhow::anyhow!("--base {base}: not a tag or digest: {e}"))
}

/// Blocks a pull fetches at once: the registry's latency per request (a few ms on
/// loopback) hidden behind the others.
const PULL_FETCHERS: usize = 8;

/// Opens `r` and, when the store has its snapshot already, returns the local one.
fn open(store: Option<&Store>, r: &Reference, opts: &Options) -> Result<Snapshot> {
    Snapshot::open_registry(r, opts, Some(&crate::restore::eager_pages), store)
        .with_context(|| format!("cannot open {r}"))
}

/// The id (hex) of the snapshot `reference` names now, if the store at `dir` has it.
pub fn stored_id(
    dir: &std::path::Path,
    reference: &str,
    opts: &RegistryOpts,
) -> Result<Option<String>> {
    let r = parse(reference)?;
    let Ok(store) = Store::open(dir) else {
        return Ok(None);
    };
    let id = registry::resolve(&r, &opts.options()).with_context(|| format!("cannot open {r}"))?;
    Ok(store.load_deferred(&id).is_ok().then(|| id.to_hex()))
}

/// `serve --warm REF`: the snapshot `reference` names, pulled into `store` unless it is
/// there already; returns its id (hex) for the daemon to warm.
pub fn pull_for_serve(store: &Store, reference: &str, opts: &RegistryOpts) -> Result<String> {
    let r = parse(reference)?;
    let start = Instant::now();
    let snap = Snapshot::open_registry(&r, &opts.options(), None, Some(store))
        .with_context(|| format!("cannot open {r}"))?;
    if snap.registry().is_none() {
        return Ok(snap.id.to_hex());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let name = r.local_name();
    let (id, rep) = registry::pull_into(&snap, store, Some(&name), PULL_FETCHERS, threads, false)
        .with_context(|| format!("cannot pull {r}"))?;
    eprintln!(
        "warmstart serve: pulled {r} as {} named {name} ({} in {:.2}s)",
        id.short(),
        human(rep.bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(id.to_hex())
}

pub fn pull(store: &Store, a: &PullArgs) -> Result<i32> {
    let r = parse(&a.reference)?;
    let name = a.name.clone().unwrap_or_else(|| r.local_name());
    let start = Instant::now();
    let snap = Snapshot::open_registry(&r, &a.registry.options(), None, Some(store))
        .with_context(|| format!("cannot pull {r}"))?;
    if snap.registry().is_none() {
        store.load(&snap.id).with_context(|| {
            format!(
                "{r} names snapshot {}, whose copy in the store is damaged: remove it \
                 (`warmstart rm {}`) and pull again",
                snap.id.short(),
                snap.id.short()
            )
        })?;
        store.set_name(&name, &snap.id)?;
        println!("{} is in the store already, named {name}", snap.id.short());
        return Ok(0);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (id, rep) = registry::pull_into(&snap, store, Some(&name), PULL_FETCHERS, threads, false)
        .with_context(|| format!("cannot pull {r}"))?;
    let t = start.elapsed();
    println!(
        "pulled {r} as {} named {name}: {} of blocks in {:.2}s ({}/s; waited {:.2}s for the \
         registry, {:.2}s verifying and storing, {:.2}s flushing)",
        id.short(),
        human(rep.bytes),
        t.as_secs_f64(),
        human((rep.bytes as f64 / t.as_secs_f64().max(1e-6)) as u64),
        rep.waited.as_secs_f64(),
        rep.stored.as_secs_f64(),
        rep.committed.as_secs_f64(),
    );
    Ok(0)
}

pub fn login(a: &LoginArgs) -> Result<i32> {
    if a.registry.contains('/') {
        bail!(
            "{}: give the registry only (HOST[:PORT]), not a repository",
            a.registry
        );
    }
    let mut password = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        bail!("no password on standard input: pipe it in (echo ... | warmstart login ...)");
    }
    let path = registry::client::save_docker_credentials(&a.registry, &a.username, password)?;
    println!("credentials for {} kept in {}", a.registry, path.display());
    Ok(0)
}

/// The background pull of `run REF`.
pub type Puller = std::thread::JoinHandle<Result<()>>;

/// What `run REF` runs from a registry: the snapshot (the store's when it has it
/// already), and a background thread that fetches the rest and stores it (none when
/// local or `stream` is false).
pub fn open_for_run(
    store: Option<&Store>,
    reference: &str,
    opts: &RegistryOpts,
    stream: bool,
) -> Result<(std::sync::Arc<Snapshot>, Option<Puller>)> {
    let r = parse(reference)?;
    let snap = std::sync::Arc::new(open(store, &r, &opts.options())?);
    let Some(remote_store) = store
        .filter(|_| stream && snap.registry().is_some())
        .cloned()
    else {
        return Ok((snap, None));
    };
    let s = snap.clone();
    let name = r.local_name();
    let h = std::thread::Builder::new()
        .name("warmstart-pull".into())
        .spawn(move || -> Result<()> {
            // Background work: the instance's faults come first. (Threads it starts
            // inherit the nice value.)
            // SAFETY: setpriority on this thread (its tid); no memory is passed.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
            }
            registry::pull_into(&s, &remote_store, Some(&name), 2, 1, true)?;
            Ok(())
        })
        .context("cannot start the background pull")?;
    Ok((snap, Some(h)))
}
