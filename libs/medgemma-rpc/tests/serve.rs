//! A real server on 127.0.0.1:0: health, reflection v1 and v1alpha, bounded drain.

use std::time::Duration;

use medgemma_rpc::{RpcError, RpcServer, Running, ServeOptions};
use tokio_stream::StreamExt;
use tonic::service::Routes;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const SERVICE: &str = "medgemma.tokenizer.v1.Tokenizer";

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn check(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r: tonic::Response<HealthCheckResponse>| r.into_inner().status)
        .unwrap()
}

async fn list_v1(addr: std::net::SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

async fn list_v1alpha(addr: std::net::SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "grpc.health.v1.Health".into(),
        )),
    };
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request, list]))
        .await
        .unwrap()
        .into_inner();
    // grpcurl describes health through v1alpha: its descriptor must be there.
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty())
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

#[tokio::test]
async fn health_flips_and_reflection_lists_the_services() {
    let server = RpcServer::bind("127.0.0.1:0", &[SERVICE]).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let Running {
        local_addr: addr,
        health,
        server: serving,
    } = server.spawn(Routes::default(), async {
        let _ = stopped.await;
    });
    assert_ne!(addr.port(), 0);

    let mut client = HealthClient::new(channel(addr).await);
    assert_eq!(
        check(&mut client, "").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        check(&mut client, SERVICE).await,
        ServingStatus::NotServing as i32
    );
    health.set_serving().await;
    assert_eq!(check(&mut client, "").await, ServingStatus::Serving as i32);
    assert_eq!(
        check(&mut client, SERVICE).await,
        ServingStatus::Serving as i32
    );

    let want = vec![
        "grpc.health.v1.Health".to_owned(),
        "grpc.reflection.v1.ServerReflection".to_owned(),
        "grpc.reflection.v1alpha.ServerReflection".to_owned(),
        SERVICE.to_owned(),
    ];
    assert_eq!(list_v1(addr).await, want);
    assert_eq!(list_v1alpha(addr).await, want);

    // With no call in flight, shutdown ends at once.
    drop(client);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test]
async fn drain_is_bounded_and_health_goes_not_serving() {
    let options = ServeOptions {
        drain_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let server = RpcServer::bind_with("127.0.0.1:0", &[SERVICE], options)
        .await
        .unwrap();
    let addr = server.local_addr();
    let health = server.health();
    health.set_serving().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(Routes::default(), async {
        let _ = stopped.await;
    }));

    // A call that never ends on its own: a health Watch stream.
    let mut client = HealthClient::new(channel(addr).await);
    let mut watch = client
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let t = std::time::Instant::now();
    stop.send(()).unwrap();
    // The open stream sees NOT_SERVING before the server goes away.
    let next = watch.next().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let result = tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve returns within the drain bound")
        .unwrap();
    assert!(
        matches!(result, Err(RpcError::DrainTimeout { .. })),
        "{result:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// A worker that ends with its server (the service was stopped and dropped) is not a dead
/// worker: the watchdog ends with the drain instead of exiting the process (which would end
/// this test binary with status 70).
#[tokio::test]
async fn the_watchdog_ends_with_its_server() {
    use medgemma_rpc::worker::{self, Jobs, WatchdogOptions};
    let server = RpcServer::bind("127.0.0.1:0", &[SERVICE]).await.unwrap();
    let health = server.health();
    health.set_serving().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(Routes::default(), async {
        let _ = stopped.await;
    }));
    let (queue, pulse) = worker::spawn(
        "watched",
        1,
        |mut jobs: Jobs<()>, _pulse| {
            while jobs.recv().is_some() {}
        },
    )
    .unwrap();
    let watchdog = tokio::spawn(worker::watchdog(
        health,
        pulse.clone(),
        WatchdogOptions {
            wedged_after: Duration::from_secs(60),
            exit_after: Some(Duration::ZERO),
            check_every: Duration::from_millis(10),
        },
    ));
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
    drop(queue);
    let t = std::time::Instant::now();
    while pulse.is_alive() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !pulse.is_alive(),
        "the worker thread ends when its queue closes"
    );
    tokio::time::timeout(Duration::from_secs(2), watchdog)
        .await
        .expect("the watchdog ends after its server stopped")
        .unwrap();
}
