use medgemma_model::*;
fn main() -> anyhow::Result<()> {
    let path = std::path::PathBuf::from(
        std::env::var("HOME")? + "/.cache/medgemma/demo/gemma-3-270m-q4_k_m.gguf",
    );
    let m = Gemma3::load(&path, &LoadOptions::default())?;
    let mut kv = m.new_kv_cache(KvCacheConfig::default());
    let prompt: Vec<u32> = (0..128).map(|i| 1000 + i * 7).collect();
    if std::env::var("ONLY_DECODE").is_ok() {
        for _ in 0..10 {
            let mut s = kv.new_sequence();
            for _ in 0..64 {
                m.forward(
                    &mut kv,
                    &mut [SeqInput {
                        kv: &mut s,
                        tokens: &[7],
                        image_embeds: None,
                        logits: LogitsRows::None,
                    }],
                )?;
            }
            kv.release(&mut s);
        }
        return Ok(());
    }
    for _ in 0..4 {
        let mut s = kv.new_sequence();
        let t0 = std::time::Instant::now();
        m.forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s,
                tokens: &prompt,
                image_embeds: None,
                logits: LogitsRows::Last,
            }],
        )?;
        let pp = 128.0 / t0.elapsed().as_secs_f64();
        kv.release(&mut s);
        let mut s = kv.new_sequence();
        let t0 = std::time::Instant::now();
        let mut tok = 2;
        for _ in 0..64 {
            let o = m.forward(
                &mut kv,
                &mut [SeqInput {
                    kv: &mut s,
                    tokens: &[tok],
                    image_embeds: None,
                    logits: LogitsRows::Last,
                }],
            )?;
            let v: Vec<f32> = o[0].as_ref().unwrap().squeeze(0)?.to_vec1()?;
            tok = v
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0 as u32;
        }
        let tg = 64.0 / t0.elapsed().as_secs_f64();
        kv.release(&mut s);
        let mut s = kv.new_sequence();
        let t0 = std::time::Instant::now();
        for _ in 0..64 {
            m.forward(
                &mut kv,
                &mut [SeqInput {
                    kv: &mut s,
                    tokens: &[7],
                    image_embeds: None,
                    logits: LogitsRows::None,
                }],
            )?;
        }
        let nolog = t0.elapsed().as_secs_f64() * 1e3 / 64.0;
        kv.release(&mut s);
        println!(
            "pp128 {pp:.1} tok/s  tg64 {tg:.1} tok/s  decode-without-logits {nolog:.2} ms/token"
        );
    }
    Ok(())
}
