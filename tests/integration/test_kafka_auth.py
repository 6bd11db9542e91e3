"""fmnist on an authenticated, authorised Kafka: a SASL_SSL broker of this module's own
(``KAFKA_SECURITY=sasl_ssl scripts/kafka.sh up`` on free ports, started once), whose ACLs
(fmnist.brokers.kafka.acls) let the worker and the client do their part and nothing more.

Every process logs in with its password from the file the broker's script wrote
(``kafka.sasl_password_file``); no password may appear in what fmnist prints, logs or publishes.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmnist import config
from fmnist.brokers import OutMessage
from fmnist.brokers.kafka import KafkaBroker, acls
from fmnist.errors import BrokerError
from fmnist.serving import protocol
from fmnist.testing.processes import FMNIST, ROOT, WorkerProcess
from fmnist.testing.run import LABELS, WORKER_START_S, OwnKafka
from fmnist.testing.topics import Topics
from fmnist.testing.waiting import poll_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

IMAGE = "sneaker7.png"
FAST_S = 8.0  # a refused login must end well before the 10 s connect timeout
USERS = ("admin", "fmnist-worker", "fmnist-client")


class Secure:
    """The module's broker, its topics (ACLs granted on them) and its worker."""

    def __init__(self, kafka: OwnKafka, topics: Topics, workdir: Path) -> None:
        self.kafka, self.topics, self.workdir = kafka, topics, workdir
        self.worker: WorkerProcess | None = None
        self.printed: list[str] = []  # everything the CLI printed, for the password grep

    def env(self, user: str, password_file: bool = True, **extra: str) -> dict[str, str]:
        return self.topics.env({**self.kafka.login(user, password_file),
                                "FMNIST_FEEDBACK__SENT_DIR": str(self.workdir / "sent"),
                                **extra})

    def config(self, user: str) -> config.Config:
        return config.load(env=self.env(user))

    def broker(self, user: str) -> KafkaBroker:
        return KafkaBroker(self.config(user))

    def cli(self, user: str, *args: str, password_file: bool = True, timeout: float = 60,
            **extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        done = subprocess.run([*FMNIST, *args], cwd=ROOT, capture_output=True, text=True,
                              env=self.env(user, password_file, **extra), timeout=timeout)
        self.printed += [done.stdout, done.stderr]
        return done, time.monotonic() - started

    def passwords(self) -> dict[str, str]:
        return {user: self.kafka.password_file(user).read_text().strip() for user in USERS}


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    """The SASL_SSL broker (a start that fails fails the module: never a skip), the ACLs on a
    private set of topics, and one worker logged in as fmnist-worker."""
    workdir = tmp_path_factory.mktemp("kafka-auth")
    kafka = OwnKafka(workdir / "state", security="sasl_ssl")
    world = Secure(kafka, Topics("kafka"), workdir)
    try:
        seconds = kafka.up()
        print(f"SASL_SSL Kafka up in {seconds:.1f} s")
        acls.apply(world.config("admin"), "fmnist-worker", "fmnist-client")
        topics = world.topics
        world.worker = WorkerProcess(topics, workdir / "worker.log",
                                     env=kafka.login("fmnist-worker"))
        yield world
    finally:
        if world.worker is not None:
            world.worker.kill()
        kafka.down()


def test_secrets_are_files_of_their_own(secure: Secure) -> None:
    for user in USERS:
        path = secure.kafka.password_file(user)
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert len(path.read_text().strip()) >= 32
    assert (secure.kafka.state / "certs" / "broker.pem").stat().st_mode & 0o077 == 0
    listeners = (secure.kafka.state / "server.properties").read_text()
    assert "PLAINTEXT://" not in listeners.replace("SASL_PLAINTEXT", "")  # no open listener


def test_worker_answers_send_wait_with_credentials(secure: Secure) -> None:
    done, _ = secure.cli("fmnist-client", "send", IMAGE, "--wait", "--json",
                         timeout=WORKER_START_S + 60, **{"FMNIST_BROKER__CONNECT_TIMEOUT_S": "10"})
    assert secure.worker is not None
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{secure.worker.output()}"
    (answer,) = json.loads(done.stdout)
    assert answer["status"] == "ok", answer
    assert answer["label"] == LABELS[IMAGE]["label"]


@pytest.mark.parametrize(("case", "env", "expected"), [
    ("wrong password", {"FMNIST_KAFKA__SASL_PASSWORD": "not-the-password"},
     ["refused the login of user fmnist-client", "FMNIST_KAFKA__SASL_PASSWORD_FILE"]),
    ("no password", {}, ["kafka.sasl_password is not set", "FMNIST_KAFKA__SASL_PASSWORD_FILE"]),
    ("no credentials", {"FMNIST_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT",
                        "FMNIST_KAFKA__SASL_MECHANISM": ""},
     ["its listener expects TLS or SASL", "FMNIST_KAFKA__SECURITY_PROTOCOL"]),
    ("no CA", {"FMNIST_KAFKA__SSL_CAFILE": ""},
     ["TLS handshake with Kafka", "FMNIST_KAFKA__SSL_CAFILE"]),
], ids=["wrong-password", "no-password", "no-credentials", "no-ca"])
def test_a_failed_login_fails_fast_and_says_what_to_fix(secure: Secure, case: str,
                                                        env: dict[str, str],
                                                        expected: list[str]) -> None:
    with_file = case == "no CA"
    done, seconds = secure.cli("fmnist-client", "send", IMAGE, "--wait", "--timeout", "30",
                               password_file=with_file, **env)
    assert done.returncode == 4, f"{case}: rc {done.returncode}\n{done.stdout}{done.stderr}"
    assert seconds < FAST_S, f"{case}: took {seconds:.1f} s"
    assert "Traceback" not in done.stderr
    for words in expected:
        assert words in done.stderr, f"{case}: {words!r} not in {done.stderr}"


def test_the_client_may_not_read_dead_letters_nor_delete_topics(secure: Secure) -> None:
    client = secure.broker("fmnist-client")
    try:
        with pytest.raises(BrokerError) as read:
            client.consumer(secure.topics.dlq, group=None)
        assert (f"grant User:fmnist-client Describe on Topic:{secure.topics.dlq}"
                in read.value.message)
        with pytest.raises(BrokerError) as deleted:
            client.delete_topics([secure.topics.request])
        assert (f"grant User:fmnist-client Delete on Topic:{secure.topics.request}"
                in deleted.value.message)
        with pytest.raises(BrokerError) as forged:  # nor answer in a worker's name
            client.producer().publish([OutMessage(secure.topics.response, b"{}", key="x")], 10)
        assert (f"grant User:fmnist-client Write on Topic:{secure.topics.response}"
                in forged.value.message)
        with pytest.raises(BrokerError) as joined:  # nor read requests as a worker would
            client.consumer(secure.topics.request, group=secure.topics.group).next_batch(1, 5)
        assert (f"grant User:fmnist-client Read on Group:{secure.topics.group}"
                in joined.value.message)
    finally:
        client.close()
    admin = secure.broker("admin")
    try:  # the refused deletion deleted nothing
        assert admin.partitions(secure.topics.request)
    finally:
        admin.close()


def test_a_worker_without_an_acl_names_it(secure: Secure) -> None:
    """Its Write on the answers' topic taken away, the worker's log names that ACL; granted
    again, the request is answered."""
    write = acls.Grant("fmnist-worker", acls.WRITE, acls.ResourceType.TOPIC,
                       secure.topics.response)
    admin_cfg = secure.config("admin")
    acls.revoke(admin_cfg, write)
    assert secure.worker is not None
    try:
        reader = secure.broker("fmnist-client")
        responses = reader.consumer(secure.topics.response, group=None)
        producer = reader.producer()
        rid = protocol.new_request_id()
        producer.publish([OutMessage(secure.topics.request, (ROOT / "Images" / IMAGE).read_bytes(),
                                     key=rid, headers=protocol.request_headers(rid, "image/png"))],
                         timeout_s=10)
        wanted = f"grant User:fmnist-worker Write on Topic:{secure.topics.response}"
        poll_until(lambda: wanted in secure.worker.output(), 30,  # type: ignore[union-attr]
                   message=f"the worker's log to name the ACL ({wanted})")
    finally:
        acls.apply(admin_cfg, "fmnist-worker", "fmnist-client")
    answered: list[str] = []

    def read() -> bool:
        answered.extend(json.loads(m.value).get("request_id", "")
                        for m in responses.next_batch(10, 0.5))
        return rid in answered

    poll_until(read, 40, message="the answer once the ACL is granted again")
    reader.close()


def test_no_password_in_logs_config_answers_or_dead_letters(secure: Secure) -> None:
    """A bad request is dead-lettered; then the worker's log, `fmnist config` (as each user),
    every answer and every dead letter, and all the CLI printed are searched for every
    password."""
    client = secure.broker("fmnist-client")
    rid = protocol.new_request_id()
    client.producer().publish([OutMessage(secure.topics.request, b"not an image", key=rid,
                                          headers=protocol.request_headers(rid, "image/png"))],
                              timeout_s=10)
    client.close()
    admin = secure.broker("admin")
    try:
        letters = admin.retained_reader(secure.topics.dlq)
        answers = admin.retained_reader(secure.topics.response)
        published: list[str] = []
        dead: list[str] = []

        def answered_and_dead_lettered() -> bool:  # the two are published independently
            for reader, into in ((letters, dead), (answers, published)):
                for m in reader.next_batch(100, 0.2):
                    into.append(m.value.decode("utf-8", "replace") + json.dumps(m.headers))
            return all(any(rid in text for text in seen) for seen in (dead, published))

        poll_until(answered_and_dead_lettered, 40,
                   message=f"the error answer and the dead letter of {rid}")
    finally:
        admin.close()
    for user in USERS:
        shown, _ = secure.cli(user, "config", "--json")
        assert shown.returncode == 0, shown.stderr
        kafka = json.loads(shown.stdout)["kafka"]
        assert kafka["sasl_password_file"] == str(secure.kafka.password_file(user))
        assert kafka["sasl_password"] == "***"
    shown, _ = secure.cli("fmnist-client", "config", password_file=False,
                          FMNIST_KAFKA__SASL_PASSWORD=secure.passwords()["fmnist-client"])
    assert "sasl_password: '***'" in shown.stdout
    assert secure.worker is not None
    searched = {"worker log": secure.worker.output(), "answers and dead letters":
                "\n".join(published + dead), "CLI output": "\n".join(secure.printed),
                "broker log": (secure.kafka.state / "logs" / "server.log").read_text()}
    assert len(published) >= 2 and dead and searched["worker log"]
    for user, password in secure.passwords().items():
        for where, text in searched.items():
            assert password not in text, f"{user}'s password in the {where}"
