//! The gateway scenario of `medgemma bench-serve`: `Ask` through the whole suite (gateway ->
//! tokenizer -> generator) against the same prompt token ids sent to the same generator
//! directly, one request at a time, greedy. The two paths alternate which goes first, so that
//! machine noise and the second one's prefix-cache hits fall on both alike. What the gateway
//! costs is the difference in output tokens per second.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use medgemma_proto::gateway::v1 as gw;
use medgemma_proto::gateway::v1::clinical_tasks_client::ClinicalTasksClient;
use medgemma_proto::generation::v1 as pb;
use medgemma_proto::generation::v1::generator_client::GeneratorClient;
use medgemma_suite::{Suite, SuiteOptions};
use medgemma_tokenizer::{ChatMessage, Tokenizer};
use tonic::transport::Channel;

/// Output tokens per second of each path.
#[derive(Debug, serde::Serialize)]
pub struct GatewayResult {
    pub requests: usize,
    pub completion_tokens: u64,
    pub direct_tokens_per_s: f64,
    pub gateway_tokens_per_s: f64,
    /// 1 - gateway / direct.
    pub overhead: f64,
}

impl std::fmt::Display for GatewayResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gateway path ({} Ask requests one at a time, {} output tokens, greedy): {:.1} output tok/s through the gateway, {:.1} sent to the generator directly: the gateway costs {:.1}%",
            self.requests,
            self.completion_tokens,
            self.gateway_tokens_per_s,
            self.direct_tokens_per_s,
            self.overhead * 100.0
        )
    }
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

async fn direct_one(
    client: &mut GeneratorClient<Channel>,
    ids: Vec<u32>,
    max_new_tokens: u32,
) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let r = client
        .generate(pb::GenerateRequest {
            prompt_ids: ids,
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.0),
                max_new_tokens: Some(max_new_tokens),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((
        t.elapsed(),
        u64::from(r.usage.map_or(0, |u| u.completion_tokens)),
    ))
}

async fn gateway_one(
    client: &mut ClinicalTasksClient<Channel>,
    question: String,
    max_new_tokens: u32,
) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let a = client
        .ask(gw::AskRequest {
            question,
            system: None,
            sampling: Some(gw::Sampling {
                temperature: Some(0.0),
                max_new_tokens: Some(max_new_tokens),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    Ok((
        t.elapsed(),
        u64::from(a.usage.map_or(0, |u| u.completion_tokens)),
    ))
}

pub async fn run(
    requests: usize,
    max_new_tokens: u32,
    tokenizer: &Tokenizer,
) -> anyhow::Result<GatewayResult> {
    // An even count: each path goes first equally often.
    let requests = requests + requests % 2;
    let suite = Suite::start(SuiteOptions {
        fetch: false,
        ..SuiteOptions::default()
    })
    .await
    .context("starting the suite (run `medgemma fetch-demo` first)")?;
    let mut gateway = ClinicalTasksClient::new(connect(suite.gateway.addr).await?);
    let mut direct = medgemma_rpc::with_limits!(GeneratorClient::new(
        connect(suite.text[0].server.addr).await?
    ));
    let template = tokenizer
        .chat_template()
        .context("the tokenizer has no chat template")?;
    let (mut t_direct, mut t_gateway) = (Duration::ZERO, Duration::ZERO);
    let (mut n_direct, mut n_gateway) = (0u64, 0u64);
    for i in 0..requests {
        let question = format!(
            "A {}-year-old presents with fatigue and a hemoglobin of {} g/dL. What are the next steps?",
            30 + i,
            8 + i % 5
        );
        // What the gateway renders for `Ask` without a system prompt of its own.
        let msgs = [
            ChatMessage::system(medgemma_gateway::prompt::MEDICAL_SYSTEM_PROMPT),
            ChatMessage::user(question.clone()),
        ];
        let ids = tokenizer.encode(&template.render(&msgs, true)?, false)?;
        let direct_first = i % 2 == 0;
        if direct_first {
            let (t, n) = direct_one(&mut direct, ids.clone(), max_new_tokens).await?;
            t_direct += t;
            n_direct += n;
        }
        let (t, n) = gateway_one(&mut gateway, question, max_new_tokens).await?;
        t_gateway += t;
        n_gateway += n;
        if !direct_first {
            let (t, n) = direct_one(&mut direct, ids, max_new_tokens).await?;
            t_direct += t;
            n_direct += n;
        }
    }
    let _ = suite.stop(Duration::from_secs(10)).await;
    if n_direct != n_gateway {
        bail!(
            "the two paths generated {n_direct} and {n_gateway} tokens for the same prompts: the gateway's prompt differs from the one sent directly"
        );
    }
    let direct_tps = n_direct as f64 / t_direct.as_secs_f64();
    let gateway_tps = n_gateway as f64 / t_gateway.as_secs_f64();
    Ok(GatewayResult {
        requests,
        completion_tokens: n_gateway,
        direct_tokens_per_s: direct_tps,
        gateway_tokens_per_s: gateway_tps,
        overhead: 1.0 - gateway_tps / direct_tps,
    })
}
