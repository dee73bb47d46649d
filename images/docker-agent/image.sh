# streamspace/docker-agent: `python -m agent_clients.docker_agent`, as uid 10001.
# Run it on the Docker host with the engine's socket, in the socket's group, in the host's
# network namespace with CAP_NET_ADMIN (egress rules go into the host's iptables):
#   docker run -d --network host --cap-add NET_ADMIN \
#     -v /var/run/docker.sock:/var/run/docker.sock --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -e AGENT_ID=... -e AGENT_TOKEN=... -e CONTROL_PLANE_URL=... streamspace/docker-agent:latest
# The iptables binaries carry the file capabilities cap_net_admin,cap_net_raw (+ep), so
# the unprivileged agent can run them; without --cap-add NET_ADMIN they cannot run and
# every create fails with that reason. images/docker-agent/Dockerfile: the same recipe
# for those who can pull.
IMAGE=streamspace/docker-agent
PACKAGES=(iptables)
REQUIREMENTS=agent_clients/requirements.txt
INPUTS=(agent_clients)
CHANGES=(
    'ENV PATH=/opt/streamspace/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    'ENV PYTHONUNBUFFERED=1 LANG=C.UTF-8 STATUS_FILE=/run/streamspace/agent-status'
    'WORKDIR /app'
    'USER 10001:10001'
    'HEALTHCHECK --interval=5s --timeout=3s --retries=3 CMD ["streamspace-healthcheck"]'
    'CMD ["python", "-m", "agent_clients.docker_agent"]'
)

configure() {
    install -m 0755 "$HERE/images/docker-agent/healthcheck.sh" "$ROOTFS/usr/local/bin/streamspace-healthcheck"
    install -d -o "$UID_GID" -g "$UID_GID" "$ROOTFS/run/streamspace"
    local multi
    for multi in xtables-nft-multi xtables-legacy-multi; do
        [ -f "$ROOTFS/usr/sbin/$multi" ] && setcap cap_net_admin,cap_net_raw+ep "$ROOTFS/usr/sbin/$multi"
    done
    [ -n "$(getcap "$ROOTFS/usr/sbin/xtables-nft-multi")" ] || die "setcap on iptables did not stick"
}
