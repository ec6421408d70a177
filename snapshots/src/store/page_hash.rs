//! blake3 of many 4 KiB pages at once.
//!
//! `blake3::hash` of one page compresses its four 1 KiB chunks side by side, which fills
//! a quarter of an AVX-512 unit (16 lanes). Here the chunks of up to 16 pages go through
//! the crate's parallel `hash_many` together (chunk `j` of every page in one call, with
//! that chunk's counter), then the pages' two parent nodes and their roots, so every
//! lane works: the same hashes (a page is one 4-chunk blake3 tree), about three times
//! faster here. `hash_many` is the crate's `platform` interface, which it marks unstable;
//! the unit test below and a check at first use against `blake3::hash` guard it (on a
//! mismatch every page is hashed with `blake3::hash`).

use std::sync::OnceLock;

use blake3::platform::Platform;
use blake3::IncrementCounter;

use crate::model::PAGE_SIZE;

const CHUNK: usize = 1024;
const CHUNKS: usize = PAGE_SIZE / CHUNK;
/// Pages hashed together (the widest SIMD degree, AVX-512).
const GROUP: usize = 16;
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;
const ROOT: u8 = 8;

/// The platform to hash on, or `None` if batched hashes did not match `blake3::hash`.
fn platform() -> Option<Platform> {
    static CHECKED: OnceLock<Option<Platform>> = OnceLock::new();
    *CHECKED.get_or_init(|| {
        let p = Platform::detect();
        let pages: Vec<[u8; PAGE_SIZE]> = (0..GROUP as u8 + 1)
            .map(|i| std::array::from_fn(|k| (k as u8).wrapping_mul(i | 1) ^ i))
            .collect();
        let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().collect();
        let mut out = vec![[0u8; 32]; refs.len()];
        batch(p, &refs, &mut out);
        let same = (pages.iter().zip(&out)).all(|(pg, h)| blake3::hash(pg).as_bytes() == h);
        if !same {
            tracing::warn!("batched page hashing disagrees with blake3::hash; hashing one by one");
        }
        same.then_some(p)
    })
}

/// `out[i]` = blake3 of `pages[i]`.
pub(crate) fn hash_pages(pages: &[&[u8; PAGE_SIZE]], out: &mut [[u8; 32]]) {
    assert_eq!(pages.len(), out.len(), "one hash per page");
    match platform() {
        Some(p) => batch(p, pages, out),
        None => {
            for (pg, h) in pages.iter().zip(out) {
                *h = *blake3::hash(&pg[..]).as_bytes();
            }
        }
    }
}

fn batch(p: Platform, pages: &[&[u8; PAGE_SIZE]], out: &mut [[u8; 32]]) {
    let mut chunk_refs: Vec<&[u8; CHUNK]> = Vec::with_capacity(GROUP);
    let mut cvs = [[0u8; 32 * GROUP]; CHUNKS];
    let mut nodes = [[0u8; 64]; 2 * GROUP];
    let mut node_cvs = [0u8; 64 * GROUP];
    let mut roots = [[0u8; 64]; GROUP];
    let mut hashes = [0u8; 32 * GROUP];
    for (group, outs) in pages.chunks(GROUP).zip(out.chunks_mut(GROUP)) {
        let k = group.len();
        for (j, cv) in cvs.iter_mut().enumerate() {
            chunk_refs.clear();
            chunk_refs.extend(
                group
                    .iter()
                    .map(|pg| <&[u8; CHUNK]>::try_from(&pg[j * CHUNK..(j + 1) * CHUNK]).unwrap()),
            );
            p.hash_many(
                &chunk_refs,
                &IV,
                j as u64,
                IncrementCounter::No,
                0,
                CHUNK_START,
                CHUNK_END,
                &mut cv[..32 * k],
            );
        }
        // Each page's tree: parent(chunk 0, chunk 1), parent(chunk 2, chunk 3), root.
        for i in 0..k {
            let cv = |j: usize| &cvs[j][32 * i..32 * (i + 1)];
            nodes[2 * i][..32].copy_from_slice(cv(0));
            nodes[2 * i][32..].copy_from_slice(cv(1));
            nodes[2 * i + 1][..32].copy_from_slice(cv(2));
            nodes[2 * i + 1][32..].copy_from_slice(cv(3));
        }
        let refs: Vec<&[u8; 64]> = nodes[..2 * k].iter().collect();
        p.hash_many(
            &refs,
            &IV,
            0,
            IncrementCounter::No,
            PARENT,
            0,
            0,
            &mut node_cvs[..64 * k],
        );
        for (i, r) in roots[..k].iter_mut().enumerate() {
            r.copy_from_slice(&node_cvs[64 * i..64 * (i + 1)]);
        }
        let refs: Vec<&[u8; 64]> = roots[..k].iter().collect();
        p.hash_many(
            &refs,
            &IV,
            0,
            IncrementCounter::No,
            PARENT | ROOT,
            0,
            0,
            &mut hashes[..32 * k],
        );
        for (i, h) in outs.iter_mut().enumerate() {
            h.copy_from_slice(&hashes[32 * i..32 * (i + 1)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_as_blake3_hash_for_every_group_size() {
        let pages: Vec<[u8; PAGE_SIZE]> = (0..40u32)
            .map(|i| {
                std::array::from_fn(|k| ((k as u32).wrapping_mul(2654435761) >> (i % 24)) as u8)
            })
            .collect();
        assert!(platform().is_some(), "batched hashes disagree");
        for n in [0, 1, 2, 15, 16, 17, 33, 40] {
            let refs: Vec<&[u8; PAGE_SIZE]> = pages[..n].iter().collect();
            let mut out = vec![[0u8; 32]; n];
            hash_pages(&refs, &mut out);
            for (pg, h) in pages.iter().zip(&out) {
                assert_eq!(blake3::hash(pg).as_bytes(), h, "{n} pages");
            }
        }
    }
}
