//! The seed module's own test, unchanged but for its `use` lines, once with
//! the native `BaselineStrategy` and once with the WASM baseline
//! (`builtin:baseline`), adapted only to construct it.

use std::sync::Arc;
use std::time::SystemTime;
use visutility_host::*;

mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::sleep;

    #[tokio::test]
    async fn baseline_strategy_triggers_on_degradation() {
        let publisher = Arc::new(MetricPublisher::new(METRIC_CHANNEL_BUFFER));

        // Baseline snapshot with good score.
        let baseline = MetricSnapshot {
            model_version: "v1".into(),
            score: 0.95,
            loss: Some(0.05),
            timestamp: SystemTime::now(),
        };

        let (supervisor, mut rx_trigger) = MonitoringSupervisor::new(
            publisher.clone(),
            BaselineStrategy::new(baseline.clone(), 0.05),
        );

        let _handle = supervisor.spawn();

        // Publish snapshots — first healthy, then degraded.
        publisher
            .publish(MetricSnapshot {
                timestamp: SystemTime::now(),
                ..baseline.clone()
            })
            .unwrap();

        publisher
            .publish(MetricSnapshot {
                score: 0.80, // degraded
                timestamp: SystemTime::now(),
                ..baseline
            })
            .unwrap();

        // Assert we receive a retrain signal.
        let signal = tokio::time::timeout(Duration::from_secs(2), rx_trigger.recv())
            .await
            .expect("timeout waiting for signal")
            .expect("channel closed");

        assert_eq!(signal.degraded_snapshot.score, 0.80);

        // Give supervisor tasks time to shut down gracefully.
        sleep(Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn wasm_baseline_strategy_triggers_on_degradation() {
        let publisher = Arc::new(MetricPublisher::new(METRIC_CHANNEL_BUFFER));

        // Baseline snapshot with good score.
        let baseline = MetricSnapshot {
            model_version: "v1".into(),
            score: 0.95,
            loss: Some(0.05),
            timestamp: SystemTime::now(),
        };

        let (supervisor, mut rx_trigger) = MonitoringSupervisor::new(
            publisher.clone(),
            WasmStrategy::baseline(&baseline, 0.05).expect("builtin:baseline loads"),
        );

        let _handle = supervisor.spawn();

        // Publish snapshots — first healthy, then degraded.
        publisher
            .publish(MetricSnapshot {
                timestamp: SystemTime::now(),
                ..baseline.clone()
            })
            .unwrap();

        publisher
            .publish(MetricSnapshot {
                score: 0.80, // degraded
                timestamp: SystemTime::now(),
                ..baseline
            })
            .unwrap();

        // Assert we receive a retrain signal.
        let signal = tokio::time::timeout(Duration::from_secs(2), rx_trigger.recv())
            .await
            .expect("timeout waiting for signal")
            .expect("channel closed");

        assert_eq!(signal.degraded_snapshot.score, 0.80);

        // Give supervisor tasks time to shut down gracefully.
        sleep(Duration::from_millis(100)).await;
    }
}
