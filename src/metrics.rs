//! Prometheus metrics. One registry per server (not the global default) so tests can
//! run several servers in one process without clashing registrations.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

const PREFIX: &str = "ladic";

pub struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub requests_refused_total: IntCounterVec,
    pub queue_wait_seconds: Histogram,
    pub batch_rows: Histogram,
    pub denoiser_step_duration_seconds: Histogram,
    pub encoder_call_duration_seconds: Histogram,
    pub decoder_call_duration_seconds: Histogram,
    pub worker_tick_duration_seconds: Histogram,
    pub queue_depth: IntGauge,
    pub queue_capacity: IntGauge,
    pub requests_in_flight: IntGauge,
    pub rows_in_flight: IntGauge,
    pub images_dropped_total: IntCounterVec,
    pub stream_events_dropped_total: IntCounter,
    pub worker_restarts_total: IntCounter,
    pub denoiser_padding_rows_total: IntCounter,
    pub open_connections: IntGauge,
    pub connections_closed_total: IntCounterVec,
    pub model_load_seconds: Gauge,
    pub build_info: GaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new_custom(Some(PREFIX.into()), None)?;
        // A caption takes a few milliseconds on a small model and seconds under load.
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 120.0,
        ];
        let requests_total = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "HTTP requests answered, by route and status code.",
            ),
            &["route", "status"],
        )?;
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from receiving a request to sending its response (a stream: to its \
                 end), by route and status class (2xx, 4xx, 5xx), so that fast refusals do \
                 not pass for fast captions.",
            )
            .buckets(latency_buckets.clone()),
            &["route", "status_class"],
        )?;
        let requests_refused_total = IntCounterVec::new(
            Opts::new(
                "requests_refused_total",
                "Requests answered overloaded, by reason: 429 queue_full (--queue-size \
                 images wait already), queue_too_slow (the queue's expected wait is longer \
                 than the request's time left), uploads_busy (the bodies being received \
                 take all of --body-memory-mib); 503 connection_limit (--max-connections \
                 open).",
            ),
            &["reason"],
        )?;
        let queue_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "queue_wait_seconds",
                "Time an image waited in the queue before a worker took it, or dropped it \
                 (its deadline passed or its client left).",
            )
            .buckets(latency_buckets),
        )?;
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new(
                "batch_rows",
                "Denoiser rows in one denoiser call of a worker: a step of its batch, in calls \
                 of at most --max-batch-rows rows (a call the model takes in parts, such as \
                 fixed-shape buckets, counts once).",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )?;
        let denoiser_step_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "denoiser_step_duration_seconds",
                "Wall time of one denoiser call of a worker (see batch_rows), all its parts \
                 included.",
            )
            .buckets(prometheus::exponential_buckets(0.000_25, 2.0, 16)?),
        )?;
        let seconds_histogram = |opts: HistogramOpts| {
            Histogram::with_opts(opts.buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?))
        };
        let encoder_call_duration_seconds = seconds_histogram(HistogramOpts::new(
            "encoder_call_duration_seconds",
            "Wall time of one encoder call over the images a worker took in.",
        ))?;
        let decoder_call_duration_seconds = seconds_histogram(HistogramOpts::new(
            "decoder_call_duration_seconds",
            "Wall time of one decoder call over a batch of rows.",
        ))?;
        let worker_tick_duration_seconds = seconds_histogram(HistogramOpts::new(
            "worker_tick_duration_seconds",
            "Wall time of one pass of a worker's loop: encoder, denoiser and decoder calls \
             and the sampler's own work on the host.",
        ))?;
        let queue_depth = IntGauge::new("queue_depth", "Images waiting for a worker.")?;
        let queue_capacity = IntGauge::new(
            "queue_capacity",
            "Images that may wait for a worker (--queue-size); queue_depth / queue_capacity \
             is how full the queue is.",
        )?;
        let requests_in_flight = IntGauge::new(
            "requests_in_flight",
            "Caption requests being handled: receiving their body, decoding, queued, \
             running or streaming (what a shutdown drain waits for).",
        )?;
        let rows_in_flight = IntGauge::new(
            "rows_in_flight",
            "Caption candidates (sampler rows) being denoised by the workers; a guided \
             candidate takes two denoiser rows of a call (see batch_rows).",
        )?;
        let images_dropped_total = IntCounterVec::new(
            Opts::new(
                "images_dropped_total",
                "Images dropped before finishing, by reason (client_gone, deadline, shutdown).",
            ),
            &["reason"],
        )?;
        let worker_restarts_total = IntCounter::new(
            "worker_restarts_total",
            "Times a worker panicked, failed the requests of its batch and restarted its loop.",
        )?;
        let stream_events_dropped_total = IntCounter::new(
            "stream_events_dropped_total",
            "Streaming step events dropped because the client read them too slowly.",
        )?;
        let denoiser_padding_rows_total = IntCounter::new(
            "denoiser_padding_rows_total",
            "Rows run only to pad denoiser calls: to a fixed row count (--cuda-graph), or \
             the halves of a denoiser exported --unconditional-half.",
        )?;
        let open_connections = IntGauge::new(
            "open_connections",
            "HTTP connections open: waiting for a request, running one, sending its answer, \
             or reading and throwing away a body its answer left unread.",
        )?;
        let connections_closed_total = IntCounterVec::new(
            Opts::new(
                "connections_closed_total",
                "HTTP connections closed, by reason: clean (no error at the connection \
                 level; a body that broke off is its request's error, in requests_total); \
                 malformed_request (the server answered 400, 414 or 431 itself; not in \
                 requests_total); header_timeout (no complete request head within \
                 --header-read-timeout-ms); client_closed (closed or reset in the middle \
                 of a request head, or while the server read a body or wrote an answer \
                 at the connection level); send_stall (took none of its answer for \
                 --send-stall-timeout-ms); over_limit (answered 503 at once: \
                 --max-connections were open); error (any other).",
            ),
            &["reason"],
        )?;
        let model_load_seconds = Gauge::new(
            "model_load_seconds",
            "Seconds the first worker took to load the bundle into ONNX Runtime.",
        )?;
        let build_info = GaugeVec::new(
            Opts::new(
                "build_info",
                "Always 1; labels carry the version, model and device.",
            ),
            &["version", "model", "device"],
        )?;
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration_seconds.clone()))?;
        registry.register(Box::new(requests_refused_total.clone()))?;
        registry.register(Box::new(queue_wait_seconds.clone()))?;
        registry.register(Box::new(batch_rows.clone()))?;
        registry.register(Box::new(denoiser_step_duration_seconds.clone()))?;
        registry.register(Box::new(encoder_call_duration_seconds.clone()))?;
        registry.register(Box::new(decoder_call_duration_seconds.clone()))?;
        registry.register(Box::new(worker_tick_duration_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(queue_capacity.clone()))?;
        registry.register(Box::new(requests_in_flight.clone()))?;
        registry.register(Box::new(rows_in_flight.clone()))?;
        registry.register(Box::new(images_dropped_total.clone()))?;
        registry.register(Box::new(stream_events_dropped_total.clone()))?;
        registry.register(Box::new(worker_restarts_total.clone()))?;
        registry.register(Box::new(denoiser_padding_rows_total.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        registry.register(Box::new(connections_closed_total.clone()))?;
        registry.register(Box::new(model_load_seconds.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        Ok(Metrics {
            registry,
            requests_total,
            request_duration_seconds,
            requests_refused_total,
            queue_wait_seconds,
            batch_rows,
            denoiser_step_duration_seconds,
            encoder_call_duration_seconds,
            decoder_call_duration_seconds,
            worker_tick_duration_seconds,
            queue_depth,
            queue_capacity,
            requests_in_flight,
            rows_in_flight,
            images_dropped_total,
            stream_events_dropped_total,
            worker_restarts_total,
            denoiser_padding_rows_total,
            open_connections,
            connections_closed_total,
            model_load_seconds,
            build_info,
        })
    }

    /// Publishes what was loaded, once the bundle is up.
    pub fn set_build_info(&self, model: &str, device: &str) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), model, device])
            .set(1.0);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_the_prefix() {
        let m = Metrics::new().unwrap();
        m.set_build_info("test", "cpu");
        m.requests_total
            .with_label_values(&["/caption", "200"])
            .inc();
        m.request_duration_seconds
            .with_label_values(&["/caption", "2xx"])
            .observe(0.1);
        m.requests_refused_total
            .with_label_values(&["queue_full"])
            .inc();
        m.images_dropped_total
            .with_label_values(&["deadline"])
            .inc();
        m.connections_closed_total
            .with_label_values(&["clean"])
            .inc();
        let text = m.render();
        for family in [
            "requests_total",
            "request_duration_seconds",
            "requests_refused_total",
            "queue_wait_seconds",
            "batch_rows",
            "denoiser_step_duration_seconds",
            "encoder_call_duration_seconds",
            "decoder_call_duration_seconds",
            "worker_tick_duration_seconds",
            "queue_depth",
            "queue_capacity",
            "requests_in_flight",
            "rows_in_flight",
            "images_dropped_total",
            "stream_events_dropped_total",
            "worker_restarts_total",
            "denoiser_padding_rows_total",
            "open_connections",
            "connections_closed_total",
            "model_load_seconds",
            "build_info",
        ] {
            assert!(
                text.contains(&format!("# HELP ladic_{family} ")),
                "{family}\n{text}"
            );
        }
    }
}
