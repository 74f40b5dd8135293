//! The gateway's configuration: one clap struct, every flag also a `MEDGEMMA_*` variable.

use std::time::Duration;

use crate::pool::parse_duration;
use crate::prompt::DEFAULT_DISCLAIMER;

/// Flags of `medgemma-gateway` (also embedded by `medgemma up`).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(
        long = "listen",
        env = "MEDGEMMA_GATEWAY_LISTEN",
        default_value = "0.0.0.0:50050"
    )]
    pub listen: String,
    /// Tokenizer service replicas, comma-separated `host:port` (DNS names resolve to every
    /// address they hold).
    #[arg(long, env = "MEDGEMMA_TOKENIZER_ADDR", value_delimiter = ',')]
    pub tokenizer_addr: Vec<String>,
    /// Generator replicas serving the text model (text tasks), comma-separated `host:port`.
    #[arg(long, env = "MEDGEMMA_TEXT_POOL", value_delimiter = ',')]
    pub text_pool: Vec<String>,
    /// Generator replicas serving the multimodal model (tasks with an image).
    #[arg(long, env = "MEDGEMMA_MULTIMODAL_POOL", value_delimiter = ',')]
    pub multimodal_pool: Vec<String>,
    /// Vision encoder replicas (paired with the multimodal model).
    #[arg(long, env = "MEDGEMMA_VISION_POOL", value_delimiter = ',')]
    pub vision_pool: Vec<String>,
    /// How often pool names are resolved again (`30s`, `500ms`, `2m`), so replicas added behind
    /// a headless Service get traffic.
    #[arg(long, env = "MEDGEMMA_RESOLVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub resolve_interval: Duration,
    /// The disclaimer every response carries.
    #[arg(long, env = "MEDGEMMA_DISCLAIMER", default_value = DEFAULT_DISCLAIMER)]
    pub disclaimer: String,
    /// Sampling temperature of a request that sets none (the field report's medical advice).
    #[arg(long, env = "MEDGEMMA_DEFAULT_TEMPERATURE", default_value_t = 0.1)]
    pub default_temperature: f32,
    /// Token budget of a request that sets none.
    #[arg(long, env = "MEDGEMMA_DEFAULT_MAX_NEW_TOKENS", default_value_t = 512)]
    pub default_max_new_tokens: u32,
    /// The largest `sampling.max_new_tokens` a request may ask for.
    #[arg(long, env = "MEDGEMMA_MAX_NEW_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_new_tokens_limit: u32,
    /// The largest image a request may carry, in bytes.
    #[arg(long, env = "MEDGEMMA_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    /// The largest question, note or option text, in bytes.
    #[arg(long, env = "MEDGEMMA_MAX_TEXT_BYTES", default_value_t = 256 << 10)]
    pub max_text_bytes: usize,
    /// Deadline of a request that brings none (`10m`; `0` for none).
    #[arg(long, env = "MEDGEMMA_REQUEST_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long in-flight calls may finish after SIGTERM (above the longest generation the
    /// limits allow); streams still running then end with UNAVAILABLE.
    #[arg(long, env = "MEDGEMMA_DRAIN_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The most prompt tokens one request may send to a generator; more is INVALID_ARGUMENT.
    #[arg(long, env = "MEDGEMMA_MAX_INPUT_TOKENS", default_value_t = 32_768)]
    pub max_input_tokens: u32,
    /// A stream caller that reads nothing for this long while a message waits is cut (its
    /// generation cancelled) with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MEDGEMMA_STREAM_SEND_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stream_send_timeout: Duration,
    /// The most attempts one downstream call makes (replicas tried) before giving up.
    #[arg(long, env = "MEDGEMMA_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Retries allowed as a fraction of first attempts (0.2: at most 20% extra load), per pool.
    #[arg(long, env = "MEDGEMMA_RETRY_BUDGET", default_value_t = 0.2)]
    pub retry_budget: f64,
    /// TLS of the gateway's own listener (and client certificates, with --tls-client-ca).
    #[command(flatten)]
    pub tls: medgemma_rpc::tls::ServerTlsArgs,
    /// TLS (mTLS) towards the backends' pools.
    #[command(flatten)]
    pub pool_tls: medgemma_rpc::tls::ClientTlsArgs,
    /// API keys, client-certificate auth, audit log, reflection.
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
}

impl GatewayArgs {
    /// The defaults, with these pools (for embedding the gateway, e.g. `medgemma up`).
    pub fn with_pools(
        listen: impl Into<String>,
        tokenizer: Vec<String>,
        text: Vec<String>,
        multimodal: Vec<String>,
        vision: Vec<String>,
    ) -> Self {
        Self {
            listen: listen.into(),
            tokenizer_addr: tokenizer,
            text_pool: text,
            multimodal_pool: multimodal,
            vision_pool: vision,
            resolve_interval: Duration::from_secs(30),
            disclaimer: DEFAULT_DISCLAIMER.to_owned(),
            default_temperature: 0.1,
            default_max_new_tokens: 512,
            max_new_tokens_limit: 4096,
            max_image_bytes: 20 << 20,
            max_text_bytes: 256 << 10,
            request_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(120),
            max_input_tokens: 32_768,
            stream_send_timeout: Duration::from_secs(30),
            max_attempts: 3,
            retry_budget: 0.2,
            tls: Default::default(),
            pool_tls: Default::default(),
            auth: Default::default(),
        }
    }

    /// Checks values clap cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("--max-attempts must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.retry_budget) {
            return Err("--retry-budget must be in [0, 1]".into());
        }
        if self.max_input_tokens == 0 || self.stream_send_timeout.is_zero() {
            return Err("--max-input-tokens and --stream-send-timeout must be above 0".into());
        }
        let t = self.default_temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(format!(
                "--default-temperature must be finite and >= 0, got {t}"
            ));
        }
        if self.default_max_new_tokens == 0 {
            return Err("--default-max-new-tokens must be at least 1".into());
        }
        if self.default_max_new_tokens > self.max_new_tokens_limit {
            return Err(format!(
                "--default-max-new-tokens ({}) is above --max-new-tokens-limit ({})",
                self.default_max_new_tokens, self.max_new_tokens_limit
            ));
        }
        if self.resolve_interval < Duration::from_millis(100) {
            return Err("--resolve-interval must be at least 100ms".into());
        }
        if self.max_image_bytes == 0 || self.max_image_bytes > medgemma_rpc::MAX_MESSAGE_BYTES / 2 {
            return Err(format!(
                "--max-image-bytes must be in 1..={}",
                medgemma_rpc::MAX_MESSAGE_BYTES / 2
            ));
        }
        if self.max_text_bytes == 0 {
            return Err("--max-text-bytes must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: GatewayArgs,
    }

    #[test]
    fn pools_are_comma_separated() {
        let cli = Cli::try_parse_from([
            "x",
            "--text-pool",
            "a:1,b:2",
            "--tokenizer-addr",
            "t:3",
            "--resolve-interval",
            "500ms",
        ])
        .unwrap();
        assert_eq!(cli.args.text_pool, vec!["a:1", "b:2"]);
        assert_eq!(cli.args.tokenizer_addr, vec!["t:3"]);
        assert!(cli.args.multimodal_pool.is_empty());
        assert_eq!(cli.args.resolve_interval, Duration::from_millis(500));
        assert_eq!(cli.args.default_temperature, 0.1);
        cli.args.validate().unwrap();
    }

    #[test]
    fn defaults_match_with_pools() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let w = GatewayArgs::with_pools("0.0.0.0:50050", vec![], vec![], vec![], vec![]);
        assert_eq!(format!("{:?}", cli.args), format!("{w:?}"));
    }
}
