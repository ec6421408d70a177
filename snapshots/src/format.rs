//! On-disk encoding of a [`Manifest`]: a fixed header followed by the postcard body.
//!
//! ```text
//!  offset
//!       0 +--------------------------------------------+
//!         | magic  b"WARMSNAP"                 8 bytes |
//!       8 +--------------------------------------------+
//!         | format version    u32 little-endian        |
//!      12 +--------------------------------------------+
//!         | body length       u64 little-endian        |
//!      20 +--------------------------------------------+
//!         | blake3(body)                      32 bytes |
//!      52 +--------------------------------------------+
//!         | body: postcard(Manifest)                   |
//!         |                    `body length` bytes     |
//!         +--------------------------------------------+
//! ```
//!
//! The file ends exactly at the end of the body. The snapshot id is the blake3 of the
//! whole encoded file (header included), see `store`.
//!
//! Version rule ([`check_version`]): a reader accepts the versions from
//! [`MIN_FORMAT_VERSION`] to its own [`FORMAT_VERSION`] (today only 17; postcard has no
//! field tags, so a change other than a variant added at the end of an enum makes an
//! older layout unreadable as the new one); an older or newer file
//! is refused with a message saying which versions this build reads, never half-decoded.

use thiserror::Error;

use crate::model::Manifest;

pub const MAGIC: [u8; 8] = *b"WARMSNAP";
/// The version this build writes.
/// Bump on every change to `model` that changes the encoding (postcard has no field
/// tags): older snapshots are then refused by version, not misread.
pub const FORMAT_VERSION: u32 = 17;
/// The oldest version this build reads.
/// 14 added `HostFacts::vdso_image` (the dumping host's vdso), 15 `cpu_features` and
/// `xsave_layout`, 16 `cpu_baseline`, 17 a timerfd's `settime_flags` and
/// `realtime_deadline_ns`, a directory's `pos`, a thread's `cpus` and a socket's
/// `more` options: an older manifest no longer decodes.
pub const MIN_FORMAT_VERSION: u32 = 17;
pub const HEADER_LEN: usize = 52;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a warmstart manifest: the file starts with {found:02x?}, not \"WARMSNAP\"")]
    BadMagic { found: Vec<u8> },
    #[error("manifest is truncated: expected {expected} bytes, got {got}")]
    Truncated { expected: u64, got: u64 },
    #[error("manifest has {extra} unexpected bytes after its end ({expected} bytes expected)")]
    TrailingBytes { expected: u64, extra: u64 },
    #[error(
        "manifest format version {found} is newer than this warmstart supports \
         (versions {min}..={max}); upgrade warmstart to read it"
    )]
    NewerVersion { found: u32, min: u32, max: u32 },
    #[error(
        "manifest format version {found} is not supported (this warmstart reads versions \
         {min}..={max}); record the snapshot again with this warmstart"
    )]
    UnsupportedVersion { found: u32, min: u32, max: u32 },
    #[error(
        "manifest checksum mismatch: header says {expected}, body hashes to {actual} \
         (the file is corrupt)"
    )]
    ChecksumMismatch { expected: String, actual: String },
    #[error("manifest body is malformed: {0}")]
    MalformedBody(String),
}

/// The one place that decides which format versions this build reads.
pub fn check_version(found: u32) -> Result<(), FormatError> {
    if found > FORMAT_VERSION {
        Err(FormatError::NewerVersion {
            found,
            min: MIN_FORMAT_VERSION,
            max: FORMAT_VERSION,
        })
    } else if found < MIN_FORMAT_VERSION {
        Err(FormatError::UnsupportedVersion {
            found,
            min: MIN_FORMAT_VERSION,
            max: FORMAT_VERSION,
        })
    } else {
        Ok(())
    }
}

pub fn encode(manifest: &Manifest) -> Vec<u8> {
    let body = postcard::to_stdvec(manifest).expect("postcard encoding of a Manifest cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode(bytes: &[u8]) -> Result<Manifest, FormatError> {
    let got = bytes.len() as u64;
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(FormatError::BadMagic {
            found: bytes[..magic_len].to_vec(),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            expected: HEADER_LEN as u64,
            got,
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    check_version(version)?;
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
    let expected = (HEADER_LEN as u64).saturating_add(body_len);
    if got < expected {
        return Err(FormatError::Truncated { expected, got });
    }
    if got > expected {
        return Err(FormatError::TrailingBytes {
            expected,
            extra: got - expected,
        });
    }
    let body = &bytes[HEADER_LEN..];
    let sum: [u8; 32] = bytes[20..52].try_into().unwrap();
    let actual = blake3::hash(body);
    if actual.as_bytes() != &sum {
        return Err(FormatError::ChecksumMismatch {
            expected: blake3::Hash::from(sum).to_hex().to_string(),
            actual: actual.to_hex().to_string(),
        });
    }
    let (manifest, rest) =
        take_cautiously::<Manifest>(body).map_err(|e| FormatError::MalformedBody(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FormatError::MalformedBody(format!(
            "{} bytes left over after the manifest",
            rest.len()
        )));
    }
    Ok(manifest)
}

/// `postcard::take_from_bytes` without trusting a length field for a preallocation.
///
/// postcard hands serde a sequence's length as its size hint whenever that many bytes
/// are left, and serde then reserves up to 1 MiB for it at once: a 60-byte manifest
/// saying "a million processes" would allocate 1 MiB before failing. This flavor
/// reports no bytes left to the size hint (`Some(0)`), so every `Vec` grows with the
/// elements actually decoded (each of which consumed input), never from a length field.
pub(crate) fn take_cautiously<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
) -> postcard::Result<(T, &'de [u8])> {
    let mut de = postcard::Deserializer::from_flavor(Cautious(bytes));
    let t = T::deserialize(&mut de)?;
    Ok((t, de.finalize()?))
}

/// A byte-slice postcard flavor whose size hint never vouches for a length field.
struct Cautious<'de>(&'de [u8]);

impl<'de> postcard::de_flavors::Flavor<'de> for Cautious<'de> {
    type Remainder = &'de [u8];
    type Source = &'de [u8];

    fn pop(&mut self) -> postcard::Result<u8> {
        let (&b, rest) = self
            .0
            .split_first()
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.0 = rest;
        Ok(b)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(0)
    }

    fn try_take_n(&mut self, ct: usize) -> postcard::Result<&'de [u8]> {
        let (a, rest) = self
            .0
            .split_at_checked(ct)
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.0 = rest;
        Ok(a)
    }

    fn finalize(self) -> postcard::Result<&'de [u8]> {
        Ok(self.0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    pub(crate) use crate::fuzz::sample_manifest;

    #[test]
    fn round_trip_sample() {
        let m = sample_manifest();
        assert_eq!(decode(&encode(&m)).unwrap(), m);
    }

    #[test]
    fn wrong_magic() {
        let mut b = encode(&sample_manifest());
        b[0] = b'X';
        let e = decode(&b).unwrap_err();
        assert!(matches!(e, FormatError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("not a warmstart manifest"));
        assert!(matches!(
            decode(b"hello"),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn truncated() {
        let b = encode(&sample_manifest());
        let e = decode(&b[..b.len() - 1]).unwrap_err();
        assert_eq!(
            e,
            FormatError::Truncated {
                expected: b.len() as u64,
                got: b.len() as u64 - 1
            }
        );
        assert!(e
            .to_string()
            .contains(&format!("expected {} bytes", b.len())));
        // Cut inside the header.
        let e = decode(&b[..20]).unwrap_err();
        assert_eq!(
            e,
            FormatError::Truncated {
                expected: HEADER_LEN as u64,
                got: 20
            }
        );
        assert!(matches!(
            decode(&b[..3]),
            Err(FormatError::Truncated { .. })
        ));
        // Empty file.
        assert!(matches!(decode(&[]), Err(FormatError::Truncated { .. })));
    }

    #[test]
    fn trailing_bytes() {
        let mut b = encode(&sample_manifest());
        b.push(0);
        assert!(matches!(
            decode(&b),
            Err(FormatError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn newer_version() {
        let mut b = encode(&sample_manifest());
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = decode(&b).unwrap_err();
        assert!(matches!(e, FormatError::NewerVersion { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("version {}", FORMAT_VERSION + 1)),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("{MIN_FORMAT_VERSION}..={FORMAT_VERSION}")),
            "{msg}"
        );
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            decode(&b),
            Err(FormatError::UnsupportedVersion { found: 0, .. })
        ));
    }

    #[test]
    fn checksum_mismatch() {
        let mut b = encode(&sample_manifest());
        let last = b.len() - 1;
        b[last] ^= 0x40;
        let e = decode(&b).unwrap_err();
        assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{e}");
        // Corrupt the stored checksum itself.
        let mut b = encode(&sample_manifest());
        b[30] ^= 1;
        assert!(matches!(
            decode(&b),
            Err(FormatError::ChecksumMismatch { .. })
        ));
    }

    /// Re-seals a tampered body so that only the body decoder can notice.
    fn reseal(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(blake3::hash(body).as_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn malformed_body() {
        let b = encode(&sample_manifest());
        let body = &b[HEADER_LEN..];
        // Body cut short but correctly checksummed.
        let e = decode(&reseal(&body[..body.len() / 2])).unwrap_err();
        assert!(matches!(e, FormatError::MalformedBody(_)), "{e}");
        // Extra bytes after a valid body.
        let mut longer = body.to_vec();
        longer.push(1);
        let e = decode(&reseal(&longer)).unwrap_err();
        assert!(e.to_string().contains("left over"), "{e}");
        // Garbage.
        assert!(matches!(
            decode(&reseal(&[0xff; 40])),
            Err(FormatError::MalformedBody(_))
        ));
    }

    #[test]
    fn error_messages_are_distinct() {
        let msgs = [
            FormatError::BadMagic { found: vec![1] }.to_string(),
            FormatError::Truncated {
                expected: 2,
                got: 1,
            }
            .to_string(),
            FormatError::NewerVersion {
                found: 2,
                min: 1,
                max: 1,
            }
            .to_string(),
            FormatError::ChecksumMismatch {
                expected: "a".into(),
                actual: "b".into(),
            }
            .to_string(),
            FormatError::MalformedBody("x".into()).to_string(),
        ];
        for (i, a) in msgs.iter().enumerate() {
            for b in &msgs[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    // ---- proptest strategies for the model ----

    fn s() -> impl Strategy<Value = String> {
        "[a-z/\\[\\]é0-9]{0,12}"
    }

    fn file_identity() -> impl Strategy<Value = FileIdentity> {
        (
            s(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<i128>(),
            any::<u32>(),
            proptest::option::of(any::<[u8; 32]>()),
            proptest::option::of(any::<i128>()),
        )
            .prop_map(|(path, dev, ino, size, mtime_ns, mode, hash, btime_ns)| {
                FileIdentity {
                    path,
                    dev,
                    ino,
                    size,
                    mtime_ns,
                    mode,
                    hash,
                    btime_ns,
                }
            })
    }

    fn creds() -> impl Strategy<Value = Creds> {
        (
            any::<[u32; 4]>(),
            any::<[u32; 4]>(),
            vec(any::<u32>(), 0..4),
            any::<[u64; 5]>(),
            any::<u32>(),
        )
            .prop_map(|(uid, gid, groups, c, securebits)| Creds {
                uid,
                gid,
                groups,
                cap_inheritable: c[0],
                cap_permitted: c[1],
                cap_effective: c[2],
                cap_bounding: c[3],
                cap_ambient: c[4],
                securebits,
            })
    }

    fn mm() -> impl Strategy<Value = MmFields> {
        any::<[u64; 11]>().prop_map(|f| MmFields {
            start_code: f[0],
            end_code: f[1],
            start_data: f[2],
            end_data: f[3],
            start_brk: f[4],
            brk: f[5],
            start_stack: f[6],
            arg_start: f[7],
            arg_end: f[8],
            env_start: f[9],
            env_end: f[10],
        })
    }

    fn vma_kind() -> impl Strategy<Value = VmaKind> {
        prop_oneof![
            s().prop_map(|name| VmaKind::Anon { name }),
            file_identity().prop_map(|file| VmaKind::File { file }),
            any::<u64>().prop_map(|id| VmaKind::Shmem { id }),
            any::<u64>().prop_map(|id| VmaKind::SharedFile { id }),
            (any::<i32>(), any::<bool>())
                .prop_map(|(shmid, writable)| VmaKind::SysvShm { shmid, writable }),
            Just(VmaKind::Vdso),
            Just(VmaKind::Vvar),
            Just(VmaKind::VvarVclock),
            Just(VmaKind::Vsyscall),
        ]
    }

    fn page_run() -> impl Strategy<Value = PageRun> {
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![
                Just(RunContent::Zero),
                any::<u64>().prop_map(|first| RunContent::Data { first })
            ],
        )
            .prop_map(|(page, count, content)| PageRun {
                page,
                count,
                content,
            })
    }

    fn vma() -> impl Strategy<Value = Vma> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
            any::<bool>(),
            any::<[bool; 8]>(),
            vma_kind(),
            any::<u64>(),
            vec(page_run(), 0..4),
        )
            .prop_map(|(start, end, prot, shared, f, kind, offset, pages)| Vma {
                start,
                end,
                prot,
                shared,
                flags: VmaFlags {
                    growsdown: f[0],
                    dontfork: f[1],
                    dontdump: f[2],
                    wipeonfork: f[3],
                    locked: f[4],
                    hugepage: f[5],
                    nohugepage: f[6],
                    mergeable: f[7],
                    sequential: f[1] && f[2],
                    random: f[3] && f[4],
                    noreserve: f[5] && f[6],
                    lockonfault: f[4] && f[6],
                    accounted: f[0] && f[7],
                },
                kind,
                offset,
                pages,
            })
    }

    fn file_desc() -> impl Strategy<Value = FileDesc> {
        prop_oneof![
            (file_identity(), any::<i32>(), any::<i64>())
                .prop_map(|(file, flags, pos)| FileDesc::Regular { file, flags, pos }),
            (s(), any::<i32>(), any::<i64>()).prop_map(|(path, flags, pos)| FileDesc::Directory {
                path,
                flags,
                pos
            }),
            (s(), any::<u64>(), any::<i32>(), any::<i64>()).prop_map(|(path, rdev, flags, pos)| {
                FileDesc::CharDev {
                    path,
                    rdev,
                    flags,
                    pos,
                }
            }),
            (any::<u64>(), any::<bool>(), any::<i32>())
                .prop_map(|(pipe, write, flags)| FileDesc::Pipe { pipe, write, flags }),
            any::<u8>().prop_map(|stdio| FileDesc::External { stdio }),
        ]
    }

    fn fd() -> impl Strategy<Value = Fd> {
        (any::<i32>(), any::<bool>(), any::<u32>(), file_desc()).prop_map(
            |(fd, cloexec, ofd, file)| Fd {
                fd,
                cloexec,
                ofd,
                file,
            },
        )
    }

    fn siginfo() -> impl Strategy<Value = SigInfo> {
        vec(any::<u8>(), 0..16).prop_map(SigInfo)
    }

    fn thread() -> impl Strategy<Value = Thread> {
        (
            any::<i32>(),
            s(),
            vec(any::<u64>(), 0..28),
            vec(any::<u8>(), 0..32),
            any::<u64>(),
            vec(siginfo(), 0..2),
            (any::<u64>(), any::<i32>(), any::<u64>()),
            proptest::option::of((any::<u64>(), any::<u32>(), any::<u32>())),
            (any::<u64>(), any::<u64>()),
            any::<u64>(),
        )
            .prop_map(
                |(
                    tid,
                    comm,
                    regs,
                    xsave,
                    sigmask,
                    pending,
                    alt,
                    rseq,
                    robust_list,
                    tid_address,
                )| {
                    Thread {
                        tid,
                        comm,
                        regs,
                        xsave,
                        sigmask,
                        pending,
                        sigaltstack: AltStack {
                            sp: alt.0,
                            flags: alt.1,
                            size: alt.2,
                        },
                        rseq: rseq.map(|(addr, len, sig)| Rseq { addr, len, sig }),
                        robust_list,
                        tid_address,
                        attrs: ThreadAttrs::default(),
                    }
                },
            )
    }

    fn process() -> impl Strategy<Value = Process> {
        let ids = any::<[i32; 4]>();
        let a = (ids, s(), file_identity(), creds());
        let b = (
            vec(
                (any::<u32>(), any::<u64>(), any::<u64>())
                    .prop_map(|(resource, cur, max)| Rlimit { resource, cur, max }),
                0..3,
            ),
            s(),
            s(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            any::<i32>(),
            mm(),
        );
        let c = (
            vec(any::<u64>(), 0..8),
            vec(vma(), 0..3),
            vec(fd(), 0..3),
            vec(
                any::<[u64; 4]>().prop_map(|a| SigAction {
                    handler: a[0],
                    flags: a[1],
                    restorer: a[2],
                    mask: a[3],
                }),
                0..4,
            ),
            vec(siginfo(), 0..2),
            vec(thread(), 0..2),
        );
        (a, b, c).prop_map(
            |(
                (ids, comm, exe, creds),
                (rlimits, cwd, root, umask, personality, no_new_privs, dumpable, mm),
                (auxv, vmas, fds, sigactions, shared_pending, threads),
            )| Process {
                pid: ids[0],
                ppid: ids[1],
                pgid: ids[2],
                sid: ids[3],
                comm,
                exe,
                creds,
                rlimits,
                cwd,
                root,
                umask,
                personality,
                no_new_privs,
                dumpable,
                mm,
                auxv,
                vmas,
                fds,
                sigactions,
                shared_pending,
                threads,
                itimers: Default::default(),
                posix_timers: vec![],
                seccomp_filters: vec![],
                private_files: vec![],
                zombie: (ids[0] % 3 == 0).then_some(ids[1]),
                zombie_sigmask: ids[0] as u64,
                fd_table_size: ids[1] as u32,
                ctty: None,
                child_subreaper: ids[2] % 2 == 0,
                thp_disable: ids[3] % 2 == 0,
                oom_score_adj: ids[3] % 1001,
            },
        )
    }

    pub(crate) fn manifest() -> impl Strategy<Value = Manifest> {
        (
            any::<u64>(),
            vec(s(), 0..4),
            s(),
            (
                s(),
                any::<[u8; 32]>(),
                any::<u64>(),
                any::<u32>(),
                vec(any::<u8>(), 0..64),
            ),
            vec(process(), 0..3),
            vec(
                (any::<u64>(), any::<u32>(), vec(any::<u8>(), 0..16))
                    .prop_map(|(id, capacity, data)| PipeObject { id, capacity, data }),
                0..3,
            ),
            any::<u64>(),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(created_unix, command, trigger, host, processes, pipes, page_count, ph)| {
                    Manifest {
                        created_unix,
                        command,
                        trigger,
                        host: HostFacts {
                            kernel_release: host.0,
                            vdso_hash: host.1,
                            xsave_features: host.2,
                            xsave_size: host.3,
                            vdso_image: host.4,
                            cpu_features: vec!["avx2".into(), "bmi2".into()],
                            xsave_layout: vec![(2, 576, 256)],
                            cpu_baseline: None,
                        },
                        clocks: crate::model::Clocks {
                            monotonic_ns: page_count as i64,
                            boottime_ns: -(page_count as i64),
                        },
                        processes,
                        pipes,
                        unix_pairs: Vec::new(),
                        file_locks: Vec::new(),
                        page_count,
                        pages_hash: ph,
                        shared_files: (page_count % 2 == 0)
                            .then(|| SharedFile {
                                id: page_count,
                                path: "/memfd:m".into(),
                                memfd: true,
                                seals: 1,
                                size: page_count >> 8,
                                ..Default::default()
                            })
                            .into_iter()
                            .collect(),
                        private_tmp: (page_count % 2 == 0).then(|| {
                            vec![crate::model::TmpEntry {
                                path: "a/b".into(),
                                owner: Default::default(),
                                mtime_ns: page_count as i128,
                                kind: crate::model::TmpKind::File {
                                    size: page_count,
                                    inline: vec![1, 2],
                                    pages: Vec::new(),
                                },
                            }]
                        }),
                        tool: (page_count % 3 == 0).then(|| crate::model::ToolInfo {
                            runtime: "python".into(),
                            argv0: "-m x".into(),
                            ..Default::default()
                        }),
                        unix_queues: Vec::new(),
                        cgroups: None,
                        namespaces: crate::model::Namespaces {
                            uts: (page_count % 2 == 1).then(|| crate::model::UtsNs {
                                hostname: "box".into(),
                                domainname: "(none)".into(),
                            }),
                            ..Default::default()
                        },
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn prop_round_trip(m in manifest()) {
            let bytes = encode(&m);
            prop_assert_eq!(decode(&bytes).unwrap(), m);
        }

        #[test]
        fn prop_mutated_never_panics(
            m in manifest(),
            flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            reseal_body in any::<bool>(),
        ) {
            let mut bytes = encode(&m);
            for (i, x) in &flips {
                let i = i.index(bytes.len());
                bytes[i] ^= x | 1;
            }
            let _ = decode(&bytes);
            let _ = decode(&bytes[..cut.index(bytes.len() + 1)]);
            if reseal_body {
                // Defeat the checksum so the body decoder sees the mutations.
                let _ = decode(&reseal(&bytes[HEADER_LEN..]));
            }
        }
    }

    #[test]
    fn fuzz_random_bytes_never_panic() {
        // xorshift: deterministic, no extra dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = encode(&sample_manifest());
        for case in 0..5000 {
            let len = (next() % 200) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if case % 2 == 0 {
                // Plausible header so the deeper paths are reached.
                buf = base.clone();
                let n = 1 + next() % 6;
                for _ in 0..n {
                    let i = (next() as usize) % buf.len();
                    buf[i] = next() as u8;
                }
                if case % 4 == 0 {
                    buf = reseal(&buf[HEADER_LEN..]);
                }
                if case % 8 == 0 {
                    buf.truncate((next() as usize) % (buf.len() + 1));
                }
            }
            let _ = decode(&buf);
        }
    }
}
