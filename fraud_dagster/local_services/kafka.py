"""A local single-node Apache Kafka broker (KRaft mode) for the demo and the tests.

The broker's jars (`org.apache.kafka:kafka_2.13` with a log4j2 binding) come from Maven Central
through Maven, once, into a git-ignored cache. `start` formats the storage on first use, starts
`kafka.Kafka` in the background and returns when the broker answers on its port; `stop` stops
only the process it started.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from fraud_dagster.errors import LocalServiceError
from fraud_dagster.local_services.process import ManagedProcess, port_is_open, wait_until
from fraud_dagster.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

KAFKA_VERSION = os.environ.get("FRAUD_KAFKA_VERSION", "4.2.0")
LOG4J_VERSION = "2.25.3"
SLF4J_VERSION = "2.0.17"
CACHE_DIR = Path(os.environ.get("FRAUD_CACHE_DIR", PROJECT_ROOT / ".cache"))

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.fraud-dagster</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2_XML = """<Configuration status="WARN">
  <Appenders>
    <RollingFile name="file" fileName="{log}" filePattern="{log}.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="file"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
  </Loggers>
</Configuration>
"""


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LocalServiceError(f"`{tool}` is not on PATH; {hint}")
    return path


def kafka_classpath(version: str = KAFKA_VERSION) -> str:
    """The broker's classpath, fetching the jars with Maven the first time."""
    libs = CACHE_DIR / "kafka" / version / "libs"
    done = libs / ".complete"
    if not done.exists():
        mvn = _require("mvn", "install Maven (Debian: `apt-get install -y maven`) to fetch Kafka")
        _require(
            "java",
            "install a Java 17+ runtime (Debian: `apt-get install -y openjdk-17-jre-headless`)",
        )
        work = libs.parent
        work.mkdir(parents=True, exist_ok=True)
        (work / "pom.xml").write_text(
            _POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION)
        )
        logger.info("fetching Apache Kafka %s jars with Maven into %s", version, libs)
        result = subprocess.run(
            [mvn, "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={libs}"],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LocalServiceError(
                f"Maven could not fetch Kafka {version}:\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        done.touch()
    return f"{libs}/*"


@dataclass
class LocalKafka:
    """One KRaft broker+controller on 127.0.0.1 with its data under `data_dir`."""

    data_dir: Path
    port: int = 9092
    controller_port: int = 9093
    host: str = "127.0.0.1"
    heap: str = "1g"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _process(self) -> ManagedProcess:
        return ManagedProcess(
            "kafka",
            self.data_dir / "kafka.pid",
            marker=f"-Dfraud.dagster.kafka.dir={self.data_dir}",
        )

    def _write_config(self) -> Path:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "log4j2.xml").write_text(_LOG4J2_XML.format(log=logs / "server.log"))
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "168",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        return path

    def _java(self, *args: str) -> list[str]:
        java = _require("java", "install a Java 17+ runtime to run Kafka")
        return [
            java,
            "-Xms256m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
            f"-Dfraud.dagster.kafka.dir={self.data_dir}",
            "-cp",
            kafka_classpath(),
            *args,
        ]

    def is_running(self) -> bool:
        return self._process.is_running()

    def start(self, timeout_seconds: float = 90.0) -> None:
        if self.is_running():
            if not port_is_open(self.host, self.port):
                raise LocalServiceError(
                    f"the broker of {self.data_dir} is running, but not on port {self.port}; "
                    "pass the port it was started with (--port), or stop it first "
                    "(`fraud-dagster kafka stop`)"
                )
            logger.info("Kafka already running at %s", self.bootstrap_servers)
            return
        if port_is_open(self.host, self.port):
            raise LocalServiceError(
                f"port {self.port} on {self.host} is taken by another process; stop it, or "
                "start the broker on a free port with `fraud-dagster kafka start --port PORT` "
                f"and set FRAUD_KAFKA_BOOTSTRAP_SERVERS={self.host}:PORT (`fraud-dagster demo` "
                "always starts it on 9092)"
            )
        config = self._write_config()
        if not (self.data_dir / "data" / "meta.properties").exists():
            cluster_id = _random_cluster_id()
            result = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(config),
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise LocalServiceError(
                    f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}"
                )
        self._process.start(
            self._java("kafka.Kafka", str(config)), log_file=self.data_dir / "logs" / "stdout.log"
        )
        try:
            wait_until(
                self._answers, timeout_seconds, f"Kafka answering on {self.bootstrap_servers}"
            )
        except LocalServiceError:
            self.stop()
            raise
        logger.info("Kafka %s is up at %s", KAFKA_VERSION, self.bootstrap_servers)

    def _answers(self) -> bool:
        if not self.is_running():
            raise LocalServiceError(
                f"Kafka exited during start; see {self.data_dir / 'logs'}/server.log"
            )
        if not port_is_open(self.host, self.port):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000
            )
        except KafkaError:
            return False
        try:
            admin.list_topics()
            return True
        except KafkaError:
            return False
        finally:
            admin.close()

    def stop(self) -> bool:
        return self._process.stop(timeout_seconds=30)


def _random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
