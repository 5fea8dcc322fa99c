//! Codec throughput on 256 KiB chunks of mixed guest-like memory: the AEAD candidates (ring and
//! RustCrypto AES-256-GCM), zstd level 1, BLAKE3, and the whole chunk encode/decode path. The
//! numbers and the choice they justify are in docs/snapshot-format.md.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::hint::black_box;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use snapshot::bench_support::ChunkCodec;

const CHUNK: usize = 256 * 1024;
const PAGE: usize = 4096;

/// A chunk that looks like a booted runtime's memory: a quarter zero pages, a quarter text,
/// a quarter pointer-rich structures (small integers and repeated high address bits), and a
/// quarter random (already-compressed or encrypted data).
fn mixed_chunk() -> Vec<u8> {
    let mut out = vec![0u8; CHUNK];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: &[&[u8]] = &[
        b"function ",
        b"return ",
        b"import ",
        b"lambda ",
        b"handler ",
        b"{\n  ",
        b"\"key\": ",
        b"None",
        b"self.",
    ];
    for (i, page) in out.chunks_mut(PAGE).enumerate() {
        match i % 4 {
            0 => {}
            1 => {
                let mut pos = 0;
                while pos < page.len() {
                    let w = words[(next() % words.len() as u64) as usize];
                    let n = w.len().min(page.len() - pos);
                    page[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                }
            }
            2 => {
                for slot in page.chunks_mut(8) {
                    let v = if next() % 2 == 0 {
                        0x7fff_a000_0000 | (next() & 0xfff8)
                    } else {
                        next() % 256
                    };
                    slot.copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                for slot in page.chunks_mut(8) {
                    slot.copy_from_slice(&next().to_le_bytes());
                }
            }
        }
    }
    out
}

fn aead(c: &mut Criterion) {
    let data = mixed_chunk();
    let mut g = c.benchmark_group("aead_seal_256k");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let key = [7u8; 32];
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    let mut buf = data.clone();
    let mut counter = 0u64;
    g.bench_function("ring_aes256gcm", |b| {
        b.iter(|| {
            counter += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&counter.to_le_bytes());
            let tag = ring_key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(n),
                    Aad::from(&[1u8; 32]),
                    &mut buf,
                )
                .unwrap();
            black_box(&tag);
        })
    });
    let rc = aes_gcm::Aes256Gcm::new(&key.into());
    g.bench_function("rustcrypto_aes256gcm", |b| {
        b.iter(|| {
            counter += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&counter.to_le_bytes());
            let tag = rc
                .encrypt_in_place_detached(&n.into(), &[1u8; 32], &mut buf)
                .unwrap();
            black_box(&tag);
        })
    });
    g.finish();
}

fn zstd_and_blake3(c: &mut Criterion) {
    let data = mixed_chunk();
    let mut g = c.benchmark_group("codec_parts_256k");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut cctx = zstd::bulk::Compressor::new(1).unwrap();
    let compressed = cctx.compress(&data).unwrap();
    println!(
        "zstd level 1 ratio on the mixed chunk: {:.3}",
        compressed.len() as f64 / CHUNK as f64
    );
    let mut out = Vec::with_capacity(CHUNK);
    g.bench_function("zstd1_compress", |b| {
        b.iter(|| {
            out.clear();
            black_box(cctx.compress_to_buffer(&data, &mut out).unwrap());
        })
    });
    let mut dctx = zstd::bulk::Decompressor::new().unwrap();
    let mut plain = vec![0u8; CHUNK];
    g.bench_function("zstd_decompress", |b| {
        b.iter(|| {
            black_box(
                dctx.decompress_to_buffer(&compressed, &mut plain[..])
                    .unwrap(),
            )
        })
    });
    g.bench_function("blake3", |b| b.iter(|| black_box(blake3::hash(&data))));
    g.finish();
}

fn chunk_path(c: &mut Criterion) {
    let data = mixed_chunk();
    let mut g = c.benchmark_group("chunk_path_256k");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut codec = ChunkCodec::new(1).unwrap();
    let encoded = codec.encode(&data).unwrap();
    println!(
        "chunk stored size: {} of {CHUNK} bytes ({:.3})",
        encoded.stored_len(),
        encoded.stored_len() as f64 / CHUNK as f64
    );
    g.bench_function("encode", |b| b.iter(|| black_box(codec.encode(&data))));
    let mut out = vec![0u8; CHUNK];
    g.bench_function("decode", |b| {
        b.iter(|| assert!(codec.decode(&encoded, &mut out)))
    });
    assert!(out == data);
    g.finish();
}

criterion_group!(benches, aead, zstd_and_blake3, chunk_path);
criterion_main!(benches);
