"""Nova's fake virt driver with a snapshot that uploads data, as a real one does.

`nova.virt.fake.FakeDriver.snapshot` only moves the task state: the image
Nova created for a `createImage` action stays `queued` for ever, so a
snapshot could never be tested. This driver's snapshot does what the
libvirt driver does with the disk it extracted (`LibvirtDriver.snapshot`):
it sets the image's disk and container format and uploads the data through
Nova's Glance API, and Glance makes the image `active`. A fake server has
no disk of its own: its disk is the image it booted from, so that image's
bytes become the snapshot's.

The server metadata key `testbed_snapshot` selects a failure, for tests:
- `hold`: the stock fake snapshot (nothing is uploaded; the image stays
  `queued`), a snapshot that never becomes active;
- `fail`: the snapshot raises, so Nova deletes the image, as it does when
  a real driver's snapshot fails.

start.sh copies this file into the venv's `nova/virt/` (Nova loads drivers
from there only) and sets `compute_driver = peer_virt.SnapshotFakeDriver`.
"""
import io

from nova.compute import task_states
from nova import exception
from nova.image import glance
from nova.virt import fake


class SnapshotFakeDriver(fake.FakeDriverWithoutFakeNodes):
    """`FakeDriverWithoutFakeNodes` whose snapshots end up `active`."""

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self._image_api = glance.API()

    def snapshot(self, context, instance, image_id, update_task_state):
        mode = (instance.metadata or {}).get("testbed_snapshot")
        if mode == "hold":
            return super().snapshot(context, instance, image_id, update_task_state)
        if instance.uuid not in self.instances:
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        if mode == "fail":
            raise exception.NovaException(
                "testbed_snapshot=fail: this snapshot fails on purpose")
        base = self._image_api.get(context, instance.image_ref)
        data = b"".join(self._image_api.download(context, instance.image_ref))
        metadata = {
            "disk_format": base.get("disk_format") or "raw",
            "container_format": base.get("container_format") or "bare",
        }
        update_task_state(task_state=task_states.IMAGE_UPLOADING,
                          expected_state=task_states.IMAGE_PENDING_UPLOAD)
        self._image_api.update(context, image_id, metadata, io.BytesIO(data),
                               purge_props=False)
