//! `medgemma.gateway.v1.ClinicalTasks`: the proto edge. Requests are validated into task types,
//! run by [`Tasks`], and answered whole or as a stream of text deltas ending with the typed
//! response.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use medgemma_proto::gateway::v1 as pb;
use pb::clinical_tasks_server::ClinicalTasks;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::audit::{AuditNote, HasUsage};
use crate::auth::SystemOverride;
use crate::error::GatewayError;
use crate::tasks::{CallCtx, Deltas, Tasks};
use crate::validate::{self, Limits};
use medgemma_rpc::deadline::Deadline;

/// How many stream messages may wait for a slow caller.
const STREAM_BUFFER: usize = 32;

/// The `ClinicalTasks` service.
#[derive(Debug, Clone)]
pub struct ClinicalTasksService {
    tasks: Arc<Tasks>,
    limits: Arc<Limits>,
    /// Deadline of a call that brings none.
    default_timeout: Option<Duration>,
    stream: StreamSettings,
}

impl ClinicalTasksService {
    /// The service over `tasks`.
    pub fn new(tasks: Arc<Tasks>, limits: Limits, default_timeout: Option<Duration>) -> Self {
        Self {
            tasks,
            limits: Arc::new(limits),
            default_timeout,
            stream: StreamSettings::default(),
        }
    }

    /// Sets how streams end when their task cannot finish them (slow readers, drain).
    pub fn with_stream_settings(mut self, stream: StreamSettings) -> Self {
        self.stream = stream;
        self
    }

    fn ctx<T>(&self, req: &Request<T>) -> CallCtx {
        CallCtx {
            deadline: Deadline::of(req, self.default_timeout),
            trace: medgemma_rpc::trace::current(req),
            task: medgemma_rpc::task(req),
        }
    }
}

/// How a streaming call ends when its task cannot finish it.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// A caller that reads nothing for this long while a message waits is cut (its
    /// generation cancelled, its KV freed) and its stream ends with RESOURCE_EXHAUSTED.
    pub send_timeout: Duration,
    /// Turns `true` when the server's drain timeout passes: running streams end with
    /// UNAVAILABLE.
    pub drain_expired: watch::Receiver<bool>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            send_timeout: Duration::from_secs(30),
            drain_expired: watch::Sender::new(false).subscribe(),
        }
    }
}

/// A task's messages, then its end. The stream never ends OK unless the task finished: a task
/// that panicked, was cut or was cancelled by the drain ends it with an error status.
pub struct TaskStream<M> {
    rx: mpsc::Receiver<Result<M, Status>>,
    end: Arc<std::sync::Mutex<Option<Status>>>,
    /// Set by the task once its final response is in the channel.
    finished: Arc<AtomicBool>,
    over: bool,
}

impl<M> Stream for TaskStream<M> {
    type Item = Result<M, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.over {
            return std::task::Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(Err(status))) => {
                self.over = true;
                std::task::Poll::Ready(Some(Err(status)))
            }
            std::task::Poll::Ready(None) if self.finished.load(Ordering::Acquire) => {
                self.over = true;
                std::task::Poll::Ready(None)
            }
            std::task::Poll::Ready(None) => {
                self.over = true;
                // No final message: the task's own end, or (it panicked) INTERNAL.
                let end = self.end.lock().ok().and_then(|mut e| e.take());
                std::task::Poll::Ready(Some(Err(end.unwrap_or_else(|| {
                    Status::internal("the task failed before it finished the stream")
                }))))
            }
            other => other,
        }
    }
}

/// Sends one message to a stream's caller within the send timeout; `false` when the caller is
/// gone or too slow (then `end` says why).
async fn send_or_cut<M>(
    tx: &mpsc::Sender<Result<M, Status>>,
    msg: Result<M, Status>,
    settings: &StreamSettings,
    end: &std::sync::Mutex<Option<Status>>,
) -> bool {
    match tx.send_timeout(msg, settings.send_timeout).await {
        Ok(()) => true,
        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            tracing::info!(
                send_timeout_s = settings.send_timeout.as_secs_f64(),
                "stream reader too slow; cut, generation cancelled"
            );
            if let Ok(mut e) = end.lock() {
                *e = Some(Status::resource_exhausted(format!(
                    "the stream was not read for {:?} (--stream-send-timeout); cut",
                    settings.send_timeout
                )));
            }
            false
        }
    }
}

/// Completes when the drain timeout has passed (never, if the sender is gone first).
async fn drain_expired(mut rx: watch::Receiver<bool>) {
    let expired = rx.wait_for(|expired| *expired).await.is_ok();
    if !expired {
        std::future::pending::<()>().await;
    }
}

/// Runs a task on its own task, sending its text deltas and then its final response (or its
/// error) to the caller. When the caller goes away or stops reading, or the drain expires,
/// the task is dropped at once (which drops the generator stream, which cancels the
/// sequence).
fn stream_task<M, R, F, Fut>(
    note: AuditNote,
    task: F,
    delta: fn(String) -> M,
    last: fn(R) -> M,
    settings: StreamSettings,
) -> TaskStream<M>
where
    M: Send + 'static,
    R: HasUsage + Send + 'static,
    F: FnOnce(Deltas) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, GatewayError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<M, Status>>(STREAM_BUFFER);
    let end = Arc::new(std::sync::Mutex::new(None));
    let task_end = end.clone();
    let finished = Arc::new(AtomicBool::new(false));
    let task_finished = finished.clone();
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            let end = task_end;
            let drain = drain_expired(settings.drain_expired.clone());
            tokio::pin!(drain);
            let (dtx, mut drx) = mpsc::channel::<String>(STREAM_BUFFER);
            let fut = task(dtx);
            tokio::pin!(fut);
            let result = loop {
                tokio::select! {
                    biased;
                    () = tx.closed() => {
                        tracing::debug!("caller went away; cancelling");
                        return;
                    }
                    () = &mut drain => {
                        if let Ok(mut e) = end.lock() {
                            *e = Some(Status::unavailable(
                                "the gateway is shutting down and its drain timeout passed",
                            ));
                        }
                        return;
                    }
                    Some(d) = drx.recv() => {
                        if !send_or_cut(&tx, Ok(delta(d)), &settings, &end).await {
                            return;
                        }
                    }
                    r = &mut fut => break r,
                }
            };
            while let Ok(d) = drx.try_recv() {
                if !send_or_cut(&tx, Ok(delta(d)), &settings, &end).await {
                    return;
                }
            }
            let msg = match result {
                Ok(r) => {
                    note.usage(r.usage());
                    Ok(last(r))
                }
                Err(e) => {
                    tracing::info!(error = %e, "task failed");
                    Err(Status::from(e))
                }
            };
            let ok = msg.is_ok();
            if send_or_cut(&tx, msg, &settings, &end).await && ok {
                // The stream ends (OK) after the final response; `tx` drops after this store.
                task_finished.store(true, Ordering::Release);
            }
        }
        .instrument(span),
    );
    TaskStream {
        rx,
        end,
        finished,
        over: false,
    }
}

fn fail(e: GatewayError) -> Status {
    tracing::info!(error = %e, "task failed");
    e.into()
}

#[tonic::async_trait]
impl ClinicalTasks for ClinicalTasksService {
    async fn ask(
        &self,
        request: Request<pb::AskRequest>,
    ) -> Result<Response<pb::AskResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        SystemOverride::check(&request, request.get_ref().system.is_some())?;
        let task = validate::ask(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.ask(&ctx, task, None).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type AskStreamStream = TaskStream<pb::AskStreamResponse>;

    async fn ask_stream(
        &self,
        request: Request<pb::AskRequest>,
    ) -> Result<Response<Self::AskStreamStream>, Status> {
        use pb::ask_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        SystemOverride::check(&request, request.get_ref().system.is_some())?;
        let task = validate::ask(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.ask(&ctx, task, Some(&d)).await },
            |t| pb::AskStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::AskStreamResponse {
                event: Some(Event::Response(r)),
            },
            self.stream.clone(),
        )))
    }

    async fn summarize_clinical_note(
        &self,
        request: Request<pb::SummarizeClinicalNoteRequest>,
    ) -> Result<Response<pb::SummarizeClinicalNoteResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::summarize(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.summarize(&ctx, task, None).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type SummarizeClinicalNoteStreamStream = TaskStream<pb::SummarizeClinicalNoteStreamResponse>;

    async fn summarize_clinical_note_stream(
        &self,
        request: Request<pb::SummarizeClinicalNoteRequest>,
    ) -> Result<Response<Self::SummarizeClinicalNoteStreamStream>, Status> {
        use pb::summarize_clinical_note_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::summarize(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.summarize(&ctx, task, Some(&d)).await },
            |t| pb::SummarizeClinicalNoteStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::SummarizeClinicalNoteStreamResponse {
                event: Some(Event::Response(r)),
            },
            self.stream.clone(),
        )))
    }

    async fn answer_multiple_choice(
        &self,
        request: Request<pb::AnswerMultipleChoiceRequest>,
    ) -> Result<Response<pb::AnswerMultipleChoiceResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::multiple_choice(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self
            .tasks
            .multiple_choice(&ctx, task, None)
            .await
            .map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type AnswerMultipleChoiceStreamStream = TaskStream<pb::AnswerMultipleChoiceStreamResponse>;

    async fn answer_multiple_choice_stream(
        &self,
        request: Request<pb::AnswerMultipleChoiceRequest>,
    ) -> Result<Response<Self::AnswerMultipleChoiceStreamStream>, Status> {
        use pb::answer_multiple_choice_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::multiple_choice(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.multiple_choice(&ctx, task, Some(&d)).await },
            |t| pb::AnswerMultipleChoiceStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::AnswerMultipleChoiceStreamResponse {
                event: Some(Event::Response(r)),
            },
            self.stream.clone(),
        )))
    }

    async fn deidentify(
        &self,
        request: Request<pb::DeidentifyRequest>,
    ) -> Result<Response<pb::DeidentifyResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        let task = validate::deidentify(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.deidentify(&ctx, task).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    async fn draft_radiology_report(
        &self,
        request: Request<pb::DraftRadiologyReportRequest>,
    ) -> Result<Response<pb::DraftRadiologyReportResponse>, Status> {
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        if let Some(image) = &request.get_ref().image {
            note.image(&image.data);
        }
        let task = validate::report(request.into_inner(), &self.limits).map_err(fail)?;
        let r = self.tasks.report(&ctx, task, None).await.map_err(fail)?;
        note.usage(r.usage.as_ref());
        Ok(Response::new(r))
    }

    type DraftRadiologyReportStreamStream = TaskStream<pb::DraftRadiologyReportStreamResponse>;

    async fn draft_radiology_report_stream(
        &self,
        request: Request<pb::DraftRadiologyReportRequest>,
    ) -> Result<Response<Self::DraftRadiologyReportStreamStream>, Status> {
        use pb::draft_radiology_report_stream_response::Event;
        let ctx = self.ctx(&request);
        let note = AuditNote::of(&request);
        if let Some(image) = &request.get_ref().image {
            note.image(&image.data);
        }
        let task = validate::report(request.into_inner(), &self.limits).map_err(fail)?;
        let tasks = self.tasks.clone();
        Ok(Response::new(stream_task(
            note,
            move |d| async move { tasks.report(&ctx, task, Some(&d)).await },
            |t| pb::DraftRadiologyReportStreamResponse {
                event: Some(Event::TextDelta(t)),
            },
            |r| pb::DraftRadiologyReportStreamResponse {
                event: Some(Event::Response(r)),
            },
            self.stream.clone(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn settings(send_timeout: Duration) -> (StreamSettings, watch::Sender<bool>) {
        let drain = watch::Sender::new(false);
        let s = StreamSettings {
            send_timeout,
            drain_expired: drain.subscribe(),
        };
        (s, drain)
    }

    impl HasUsage for String {
        fn usage(&self) -> Option<&medgemma_proto::gateway::v1::Usage> {
            None
        }
    }

    async fn all(stream: TaskStream<String>) -> Vec<Result<String, Status>> {
        tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
            .await
            .expect("the stream ends")
    }

    #[tokio::test]
    async fn a_finished_task_ends_ok_after_its_response() {
        let (s, _drain) = settings(Duration::from_secs(5));
        let stream = stream_task(
            AuditNote::default(),
            |d: Deltas| async move {
                d.send("a".into()).await.unwrap();
                Ok::<_, GatewayError>("done".to_owned())
            },
            |t| format!("delta {t}"),
            |r| format!("last {r}"),
            s,
        );
        let got: Vec<String> = all(stream).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, ["delta a", "last done"]);
    }

    #[tokio::test]
    async fn a_task_that_panics_after_output_ends_with_internal_not_ok() {
        let (s, _drain) = settings(Duration::from_secs(5));
        let stream = stream_task(
            AuditNote::default(),
            |d: Deltas| async move {
                d.send("partial".into()).await.unwrap();
                tokio::task::yield_now().await;
                if !d.is_closed() {
                    panic!("a bug in the task");
                }
                Ok::<String, GatewayError>(String::new())
            },
            |t| t,
            |r| r,
            s,
        );
        let got = all(stream).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_ref().unwrap(), "partial");
        assert_eq!(got[1].as_ref().unwrap_err().code(), tonic::Code::Internal);
    }

    #[tokio::test]
    async fn a_stalled_reader_is_cut_and_its_task_dropped() {
        let (s, _drain) = settings(Duration::from_millis(200));
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let stream = stream_task(
            AuditNote::default(),
            move |d: Deltas| async move {
                let _guard = dropped_tx; // Dropped when the task is.
                for i in 0.. {
                    if d.send(format!("{i}")).await.is_err() {
                        break;
                    }
                }
                Ok::<String, GatewayError>(String::new())
            },
            |t| t,
            |r| r,
            s,
        );
        // Nobody reads: the buffer fills, the send times out, the task is dropped.
        tokio::time::timeout(Duration::from_secs(5), dropped_rx)
            .await
            .expect("the task is dropped within the send timeout")
            .unwrap_err();
        let got = all(stream).await;
        let last = got.last().unwrap().as_ref().unwrap_err();
        assert_eq!(last.code(), tonic::Code::ResourceExhausted);
        assert!(last.message().contains("--stream-send-timeout"), "{last:?}");
        assert!(got[..got.len() - 1].iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn an_expired_drain_ends_running_streams_with_unavailable() {
        let (s, drain) = settings(Duration::from_secs(5));
        let stream = stream_task(
            AuditNote::default(),
            |d: Deltas| async move {
                d.send("started".into()).await.unwrap();
                std::future::pending::<()>().await;
                Ok::<String, GatewayError>(String::new())
            },
            |t| t,
            |r| r,
            s,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain.send_replace(true);
        let got = all(stream).await;
        assert_eq!(got[0].as_ref().unwrap(), "started");
        assert_eq!(
            got.last().unwrap().as_ref().unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }
}
