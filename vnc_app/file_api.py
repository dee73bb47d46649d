"""File endpoints: ``GET /sessions/<id>/files?path=``, ``GET|PUT /sessions/<id>/files/<path>``.

These views decide *whether* a transfer may happen, through the whole stack every API
view has (authentication by JWT or login cookie with CSRF, the one access helper, the
error body): they are called by vnc_app.file_transfer with the request's headers only,
never its body. When everything passes they answer :class:`TransferAccepted`, which
carries the ticket and is never sent to anyone: the transfer module then streams the
bytes between the client and the agent itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from agent_clients import protocol
from sessions_app import selectors
from sessions_app.states import State
from streamspace.api_schema import ErrorSerializer
from streamspace.errors import Conflict, InvalidInput, ServiceError

DEFAULT_LIST_PATH = "Downloads"


class LengthRequired(ServiceError):
    status = 411
    code = "length_required"


class TooLarge(ServiceError):
    status = 413
    code = "too_large"


class AgentUnavailable(ServiceError):
    status = 503
    code = "agent_unavailable"


@dataclass(frozen=True)
class Ticket:
    """What a transfer needs once the request has passed every check."""

    op: str  # list, get, put
    path: str  # relative to the home
    size: int  # put: the body's length
    user_id: int
    session_id: str
    agent_channel: str
    client_address: str


class TransferAccepted(HttpResponse):
    """The checks passed (internal: vnc_app.file_transfer takes over, nothing is sent)."""

    def __init__(self, ticket: Ticket):
        super().__init__(status=200)
        self.ticket = ticket


def _check_path(path, *, allow_empty: bool = False) -> str:
    if problem := protocol.file_path_problem(path, allow_empty=allow_empty):
        raise InvalidInput(problem, field="path")
    return path


def _ticket(request, session_id, op: str, path: str, size: int = 0) -> TransferAccepted:
    session = selectors.session_get_for_user(user=request.user, session_id=session_id)
    path = _check_path(path, allow_empty=op == "list")
    if session.state != State.RUNNING:
        raise Conflict(f"the session is {session.state}, not running: files move only while it runs")
    channel = session.agent.channel_name if session.agent else ""
    if not channel:
        raise AgentUnavailable("the session's agent is not connected; try again when it is")
    return TransferAccepted(
        Ticket(
            op=op,
            path=path,
            size=size,
            user_id=request.user.pk,
            session_id=str(session.pk),
            agent_channel=channel,
            client_address=str(request.META.get("REMOTE_ADDR") or ""),
        )
    )


class FileEntrySerializer(serializers.Serializer):
    name = serializers.CharField()
    type = serializers.ChoiceField(choices=["file", "dir", "link", "other"])
    size = serializers.IntegerField()
    mtime = serializers.FloatField(help_text="seconds since the epoch")


class FileListSerializer(serializers.Serializer):
    path = serializers.CharField(help_text="the folder listed, relative to the home")
    entries = FileEntrySerializer(many=True)
    truncated = serializers.BooleanField(help_text="the folder holds more than the 1000 entries listed")


class FileUploadedSerializer(serializers.Serializer):
    name = serializers.CharField()
    path = serializers.CharField()
    size = serializers.IntegerField()


_IN_FLIGHT = {
    "409": OpenApiResponse(ErrorSerializer, description="the session is not running"),
    "429": OpenApiResponse(ErrorSerializer, description="FILE_TRANSFER_MAX_PER_SESSION transfers already running"),
    "502": OpenApiResponse(
        ErrorSerializer,
        description="the agent or the desktop failed (a download that fails after its headers is cut short instead)",
    ),
    "503": OpenApiResponse(
        ErrorSerializer, description="the session's agent is not connected, or the database is unavailable"
    ),
}
_FILE_PATH = OpenApiParameter(
    "file_path", str, OpenApiParameter.PATH, description="relative to the session's home, e.g. Uploads/report.pdf"
)


class _FileAPIView(APIView):
    """No HEAD (it would run a whole download and write an audit row: 405), and no content
    negotiation (a download is bytes whatever ``Accept`` says; every refusal is JSON)."""

    http_method_names = ["get", "put", "options"]
    negotiates = False  # streamspace.api_schema: no 406 nor 415 in the schema

    def perform_content_negotiation(self, request, force=False):
        renderer = JSONRenderer()
        return renderer, renderer.media_type


class FileListView(_FileAPIView):
    @extend_schema(
        parameters=[
            OpenApiParameter(
                "path", str, description=f"folder relative to the home (default {DEFAULT_LIST_PATH}; empty: the home)"
            )
        ],
        responses={200: FileListSerializer, **{k: v for k, v in _IN_FLIGHT.items() if k != "429"}},
        description="What a folder of the session's home holds (at most 1000 entries).",
        operation_id="v1_sessions_files_list",
    )
    def get(self, request, session_id):
        return _ticket(request, session_id, "list", request.query_params.get("path", DEFAULT_LIST_PATH))


class FileView(_FileAPIView):
    @extend_schema(
        parameters=[_FILE_PATH],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="the file, streamed"),
            **_IN_FLIGHT,
        },
        description="Download a file of the session's home, streamed.",
        operation_id="v1_sessions_files_download",
    )
    def get(self, request, session_id, file_path):
        return _ticket(request, session_id, "get", file_path)

    @extend_schema(
        parameters=[_FILE_PATH],
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={
            201: FileUploadedSerializer,
            "408": OpenApiResponse(ErrorSerializer, description="the client sent nothing for too long"),
            "411": OpenApiResponse(ErrorSerializer, description="no Content-Length"),
            **_IN_FLIGHT,
        },
        description=(
            "Upload the raw body as this file (replacing one of that name), streamed. Written under a "
            "temporary name and renamed once complete; over FILE_TRANSFER_MAX_BYTES is 413 before a byte is read."
        ),
    )
    def put(self, request, session_id, file_path):
        length = request.META.get("CONTENT_LENGTH")
        selectors.session_get_for_user(user=request.user, session_id=session_id)  # 404 before anything else
        if not length:
            raise LengthRequired("send the file's size as Content-Length")
        try:
            size = int(length)
        except ValueError:
            raise LengthRequired("Content-Length must be a number") from None
        if size > settings.FILE_TRANSFER_MAX_BYTES:
            raise TooLarge(f"the file is larger than the {settings.FILE_TRANSFER_MAX_BYTES} bytes this server accepts")
        return _ticket(request, session_id, "put", file_path, size)
