"""Session and template endpoints: parse, check access, call a service, serialize."""

from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from sessions_app import lifecycle, selectors, services
from sessions_app.models import Session, Template
from sessions_app.states import State
from streamspace.text import PlainTextField


class TemplateSerializer(serializers.ModelSerializer):
    class Meta:
        model = Template
        fields = [
            "slug", "name", "description", "image", "default_cpu", "default_memory_mb", "platform", "region",
            "egress", "egress_allow", "sound", "clipboard_to_desktop", "clipboard_to_browser",
        ]  # fmt: skip
        read_only_fields = fields


class LifecycleWarningSerializer(serializers.Serializer):
    """A lifecycle action about to happen to a running session (sessions_app.lifecycle)."""

    action = serializers.ChoiceField(choices=[lifecycle.HIBERNATE, lifecycle.TERMINATE])
    at = serializers.DateTimeField()
    seconds_left = serializers.FloatField()
    detail = serializers.CharField()
    can_stay = serializers.BooleanField(help_text="POST .../keepalive (or any input) cancels it")


class SessionSerializer(serializers.ModelSerializer):
    template = serializers.CharField(source="template.slug")
    owner = serializers.CharField(source="owner.username")
    agent_id = serializers.CharField(source="agent.agent_id", default=None, allow_null=True)
    lifecycle_reason = serializers.CharField(
        read_only=True, help_text="Why a lifecycle policy last hibernated or ended the session (empty: never)"
    )
    lifecycle_warning = serializers.SerializerMethodField()

    class Meta:
        model = Session
        fields = [
            "id", "owner", "template", "state", "agent_id", "platform", "region", "cluster_id", "tags",
            "cpu", "memory_mb", "keep_home", "error_message", "created_at", "started_at", "last_activity",
            "terminated_at", "lifecycle_reason", "lifecycle_warning",
        ]  # fmt: skip

    @extend_schema_field(LifecycleWarningSerializer(allow_null=True))
    def get_lifecycle_warning(self, session):
        # One policy lookup per (template, owner) in a list, not one per session (found by review).
        policies = self.context.setdefault("lifecycle_policies", {})
        warning = lifecycle.session_warning(session, policies=policies)
        return None if warning is None else LifecycleWarningSerializer(warning).data


class SessionCreateSerializer(serializers.Serializer):
    """Shape only; values are checked by the service so the API and the portal agree."""

    template = PlainTextField(max_length=64)
    cpu = serializers.JSONField(required=False)
    memory_mb = serializers.JSONField(required=False)
    tags = serializers.JSONField(required=False)
    keep_home = serializers.JSONField(required=False)
    platform = PlainTextField(required=False, allow_blank=True, max_length=20)
    region = PlainTextField(required=False, allow_blank=True, max_length=100)


class TemplateListView(APIView):
    @extend_schema(responses=TemplateSerializer(many=True))
    def get(self, request):
        return Response(TemplateSerializer(selectors.templates_enabled(), many=True).data)


class SessionListCreateView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("state", str, description="only sessions in this state")],
        responses=SessionSerializer(many=True),
    )
    def get(self, request):
        qs = selectors.sessions_visible_to(request.user)
        wanted = request.query_params.get("state")
        if wanted:
            qs = qs.filter(state=wanted)
        return Response(SessionSerializer(qs, many=True).data)

    @extend_schema(
        request=SessionCreateSerializer,
        responses={201: SessionSerializer},
        examples=[
            OpenApiExample(
                "a desktop",
                value={"template": "desktop", "cpu": 1, "memory_mb": 1024, "tags": ["web"]},
                request_only=True,
            )
        ],
    )
    def post(self, request):
        if not isinstance(request.data, dict):
            return Response({"error": "invalid", "detail": "expected a JSON object"}, status=400)
        form = SessionCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        session = services.session_create(
            user=request.user,
            template_slug=data["template"],
            cpu=data.get("cpu"),
            memory_mb=data.get("memory_mb"),
            tags=data.get("tags"),
            keep_home=data.get("keep_home", False),
            platform=data.get("platform", ""),
            region=data.get("region", ""),
        )
        return Response(SessionSerializer(session).data, status=status.HTTP_201_CREATED)


class SessionDetailView(APIView):
    @extend_schema(responses=SessionSerializer)
    def get(self, request, session_id):
        return Response(
            SessionSerializer(selectors.session_get_for_user(user=request.user, session_id=session_id)).data
        )

    @extend_schema(responses={200: SessionSerializer, 202: SessionSerializer})
    def delete(self, request, session_id):
        session = selectors.session_get_for_user(user=request.user, session_id=session_id)
        session = services.session_terminate(session=session)
        code = status.HTTP_200_OK if session.state == State.TERMINATED else status.HTTP_202_ACCEPTED
        return Response(SessionSerializer(session).data, status=code)


class SessionHibernateView(APIView):
    @extend_schema(request=None, responses={202: SessionSerializer})
    def post(self, request, session_id):
        session = selectors.session_get_for_user(user=request.user, session_id=session_id)
        return Response(SessionSerializer(services.session_hibernate(session=session)).data, status=202)


class SessionWakeView(APIView):
    @extend_schema(request=None, responses={202: SessionSerializer})
    def post(self, request, session_id):
        session = selectors.session_get_for_user(user=request.user, session_id=session_id)
        return Response(SessionSerializer(services.session_wake(session=session)).data, status=202)


class SessionKeepaliveView(APIView):
    @extend_schema(
        request=None,
        responses={200: SessionSerializer},
        description=(
            "Someone at the viewer (the owner, or staff) is still there: counts as input, so a pending idle "
            "action is called off."
        ),
    )
    def post(self, request, session_id):
        session = selectors.session_get_for_user(user=request.user, session_id=session_id)
        return Response(SessionSerializer(services.session_keepalive(session=session)).data)
