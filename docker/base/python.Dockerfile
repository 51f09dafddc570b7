# A stand-in for python:3.11-slim-bookworm made from Debian's own packages, for hosts
# that cannot pull from a container registry. docker/base-images.sh builds it on top
# of a debootstrap root filesystem; the images then take it through PYTHON_IMAGE.
ARG DEBIAN_IMAGE=likeness-local/debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV LANG=C.UTF-8

# The building host's own certificate authorities (base-images.sh copies them here;
# the folder may be empty): pip in the image builds then trusts what the host's pip
# trusts, a TLS-inspecting proxy's CA for one.
COPY ca-certificates/ /usr/local/share/ca-certificates/
# Debian marks its Python as externally managed; like the official image, this one
# belongs to the application, so pip installs into /usr/local as the images expect.
# Debian's pip verifies against the system store that update-ca-certificates writes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-pip python-is-python3 \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && { command -v pip >/dev/null || ln -s /usr/bin/pip3 /usr/local/bin/pip; }

CMD ["python3"]
