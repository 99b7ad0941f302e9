"""Send a Databricks job's notifications to Tether: one notification
destination for the workspace (made once, by a workspace admin), named in the
`webhook_notifications` of each job Tether runs. docs/databricks.md shows this
file; the tests run it against a fake workspace.

    DATABRICKS_HOST=... DATABRICKS_TOKEN=... TETHER_URL=https://tether.example.com \\
    TETHER_DATABRICKS_NOTIFY_USER=databricks TETHER_DATABRICKS_NOTIFY_PASSWORD=... \\
    python databricks_notifications.py 123 456        # the job ids
"""

import os
import sys

from databricks.sdk import WorkspaceClient
from databricks.sdk.service import jobs, settings


def create_destination(w: WorkspaceClient, tether_url: str, user: str, password: str) -> str:
    """A webhook destination that POSTs to Tether with basic auth; its id."""
    destination = w.notification_destinations.create(
        display_name="Tether",
        config=settings.Config(
            generic_webhook=settings.GenericWebhookConfig(
                url=f"{tether_url.rstrip('/')}/backends/databricks/notifications",
                username=user,
                password=password,
            )
        ),
    )
    assert destination.id is not None
    return destination.id


def notify_tether(w: WorkspaceClient, job_id: int, destination_id: str) -> None:
    """Send the job's start, success and failure notifications to the
    destination. This sets the job's whole `webhook_notifications`: list any
    other destinations it should keep here too."""
    tether = [jobs.Webhook(id=destination_id)]
    w.jobs.update(
        job_id,
        new_settings=jobs.JobSettings(
            webhook_notifications=jobs.WebhookNotifications(
                on_start=tether, on_success=tether, on_failure=tether
            )
        ),
    )


if __name__ == "__main__":
    w = WorkspaceClient()  # DATABRICKS_HOST and a token, or a profile: as for Tether
    destination_id = create_destination(
        w,
        os.environ["TETHER_URL"],
        os.environ["TETHER_DATABRICKS_NOTIFY_USER"],
        os.environ["TETHER_DATABRICKS_NOTIFY_PASSWORD"],
    )
    for job_id in sys.argv[1:]:
        notify_tether(w, int(job_id), destination_id)
    print(f"destination {destination_id} notifies Tether for jobs {', '.join(sys.argv[1:])}")
