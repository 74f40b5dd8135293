//! Client-side helpers: a channel with our settings, and listing a server's services through
//! reflection (what grpcurl's `list` does).

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// Which server-reflection protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReflectionVersion {
    /// `grpc.reflection.v1`.
    V1,
    /// `grpc.reflection.v1alpha` (grpcurl 1.8, Python's reflection client).
    V1Alpha,
}

/// Connects to `addr` (`host:port` or a URL) over plain HTTP/2 with keep-alive.
pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    endpoint(addr)?.connect().await
}

/// The endpoint [`connect`] uses, for callers that want `connect_lazy` or a balanced channel.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_timeout(Duration::from_secs(5)))
}

/// The services a server advertises through reflection, sorted.
pub async fn list_services(
    channel: Channel,
    version: ReflectionVersion,
) -> Result<Vec<String>, Status> {
    // v1 and v1alpha are the same protocol under two generated module trees.
    macro_rules! list_services_via {
        ($pb:path) => {{
            use $pb as pb;
            let request = pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(pb::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                )),
            };
            let mut responses = pb::server_reflection_client::ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter([request]))
                .await?
                .into_inner();
            match responses
                .next()
                .await
                .transpose()?
                .and_then(|r| r.message_response)
            {
                Some(pb::server_reflection_response::MessageResponse::ListServicesResponse(
                    list,
                )) => list.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
                _ => return Err(Status::internal("unexpected reflection response")),
            }
        }};
    }
    let mut names = match version {
        ReflectionVersion::V1 => list_services_via!(tonic_reflection::pb::v1),
        ReflectionVersion::V1Alpha => list_services_via!(tonic_reflection::pb::v1alpha),
    };
    names.sort();
    Ok(names)
}

pub use tonic_health::pb::health_check_response::ServingStatus;

/// The `grpc.health.v1` status of `service` (`""`: the whole server).
pub async fn health_status(channel: Channel, service: &str) -> Result<ServingStatus, Status> {
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown))
}

/// tonic's client enforces a request's `grpc-timeout` itself and reports an expiry as
/// CANCELLED ("Timeout expired"); gRPC (and every other client) calls it DEADLINE_EXCEEDED.
/// This maps the former to the latter and returns any other status unchanged; use it on every
/// status from an outgoing call that had a deadline.
pub fn deadline_status(status: Status) -> Status {
    if status.code() != tonic::Code::Cancelled {
        return status;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&status);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return Status::deadline_exceeded("the deadline expired");
        }
        source = err.source();
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_client_timeouts_become_deadline_exceeded() {
        let timed_out = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timed_out.code(), tonic::Code::Cancelled);
        assert_eq!(
            deadline_status(timed_out).code(),
            tonic::Code::DeadlineExceeded
        );
        let cancelled = Status::cancelled("the client went away");
        assert_eq!(deadline_status(cancelled).code(), tonic::Code::Cancelled);
        let internal = Status::internal("x");
        assert_eq!(deadline_status(internal).code(), tonic::Code::Internal);
    }
}
