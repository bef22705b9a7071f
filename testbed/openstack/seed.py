"""Idempotently give the peer cloud what an operator would have set up for
nodepool, so the provider tests have something to boot:

- flavors np.tiny (1 vCPU, 64 MiB), np.small (2 vCPU, 128 MiB) and np.huge
  (24 vCPU: more than Nova's default 20-core quota, so one launch of it is a
  real quota-exceeded error);
- a public raw image np-base (64 KiB; the fake virt driver boots anything);
- an external flat network `public` (203.0.113.0/24), a shared tenant vxlan
  network `private` (10.20.0.0/24) and a router np-router between them, so
  floating IPs can be attached;
- a project np-quota with a user np-quota (password as admin's, role admin
  in that project only) whose compute quota is one instance, for the
  instance-quota test.
"""
import os

import openstack

PASSWORD = os.environ.get("OS_PASSWORD", "secret")
conn = openstack.connect(
    auth_url="http://127.0.0.1:5000/v3", username="admin", password=PASSWORD,
    project_name="admin", user_domain_name="Default", project_domain_name="Default",
    region_name="RegionOne", identity_api_version="3")

for name, vcpus, ram in (("np.tiny", 1, 64), ("np.small", 2, 128), ("np.huge", 24, 256)):
    if not conn.compute.find_flavor(name, ignore_missing=True):
        conn.compute.create_flavor(name=name, vcpus=vcpus, ram=ram, disk=1)
        print("flavor", name)

if not conn.image.find_image("np-base", ignore_missing=True):
    conn.image.create_image(name="np-base", disk_format="raw", container_format="bare",
                            data=b"\0" * 65536, visibility="public", allow_duplicates=True)
    print("image np-base")

ext = conn.network.find_network("public")
if not ext:
    ext = conn.network.create_network(name="public", is_router_external=True,
                                      provider_network_type="flat",
                                      provider_physical_network="public")
if not list(conn.network.subnets(network_id=ext.id)):
    conn.network.create_subnet(network_id=ext.id, name="public-v4", ip_version=4,
                               cidr="203.0.113.0/24", is_dhcp_enabled=False)
net = conn.network.find_network("private")
if not net:
    net = conn.network.create_network(name="private", is_shared=True)
subs = list(conn.network.subnets(network_id=net.id))
sub = subs[0] if subs else conn.network.create_subnet(
    network_id=net.id, name="private-v4", ip_version=4, cidr="10.20.0.0/24")
router = conn.network.find_router("np-router")
if not router:
    router = conn.network.create_router(name="np-router",
                                        external_gateway_info={"network_id": ext.id})
    conn.network.add_interface_to_router(router, subnet_id=sub.id)
print("networks public/private, router np-router")

project = conn.identity.find_project("np-quota") or conn.identity.create_project(
    name="np-quota", domain_id="default", description="one-instance quota for tests")
user = conn.identity.find_user("np-quota", domain_id="default") or conn.identity.create_user(
    name="np-quota", password=PASSWORD, domain_id="default", default_project_id=project.id)
# admin in its own project: with only `member`, Neutron's policy refuses the
# port delete Nova does when the server is deleted (the port is on `private`,
# a shared network of the admin project). Quotas apply to admins too.
for role in ("member", "admin"):
    conn.identity.assign_project_role_to_user(project, user, conn.identity.find_role(role))
conn.set_compute_quotas(project.id, instances=1)
print("project np-quota (instances quota 1)")
