"""What django_service's probe.yml compares, read in one round trip (run with -c: nothing is left on
the host). Arguments: the unit's file, the unit, the static files' nginx site, the link that enables
it (empty: no static files). Prints JSON: for each file its sha1, owner, group and mode (none when
missing), the link's target, whether nginx is installed, and `systemctl is-active` / `is-enabled`
of the unit and of nginx."""

import hashlib
import json
import os
import subprocess
import sys


def file_facts(path):
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        digest = hashlib.sha1(handle.read()).hexdigest()  # noqa: S324 - compared with Ansible's hash('sha1')
    st = os.stat(path)
    return {"sha1": digest, "uid": st.st_uid, "gid": st.st_gid, "mode": "%04o" % (st.st_mode & 0o7777)}


def systemctl(verb, unit):
    done = subprocess.run(["systemctl", verb, unit], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return done.stdout.strip()


unit_file, unit, site, link = sys.argv[1:5]
services = [unit] + (["nginx.service"] if site else [])
print(
    json.dumps(
        {
            "unit_file": file_facts(unit_file),
            "site": file_facts(site),
            "link": os.readlink(link) if link and os.path.islink(link) else "",
            "nginx": os.path.exists("/usr/sbin/nginx"),
            "services": {
                name: {"active": systemctl("is-active", name), "enabled": systemctl("is-enabled", name)} for name in services
            },
        }
    )
)
